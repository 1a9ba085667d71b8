"""Reward models end to end on the demo task: an ORM trained on the demo SFT model's own samples
(labelled by the verifier) ranks them, and its best-of-N accuracy rises with N; PRM step labels
from a real policy equal the rollout fractions.

Uses the session's demo run (tests/e2e/conftest.py), whose third stage trains the ORM, so only
best-of-N sampling and scoring are paid for here. Every stage is seeded and deterministic on CPU.
"""

import json
import os

import pytest
import yaml

from _e2e_helpers import read_metrics, set_dotted

pytestmark = pytest.mark.e2e

# Sizes (the demo's rm.yaml): RM data from 4000 training prompts x 8 samples (top-p 0.9), 800 RM steps of
# 64 sequences; best-of-N on all 200 held-out prompts with 16 samples each.
RM_PROMPTS, RM_SAMPLES, RM_STEPS = 4000, 8, 800
BON_N = [1, 2, 4, 8, 16]


def _job(demo_run, out, kind, **over) -> dict:
    """An RM (kind=rm) or best-of-N (kind=bon) job on the demo task, TP2 on 2 CPU slots."""
    job = {
        "kind": kind, "name": f"e2e-{kind}", "output_dir": str(out), "seed": 1,
        "cluster": {"num_nodes": 1, "gpus_per_node": 2, "device": "cpu",
                    "placement": "colocate_all"},
        "actor": {"model": {"hf_dir": demo_run["sft_hf"], "dtype": "fp32"},
                  "parallel": {"tp": 2}, "num_gpus": 2, "micro_batch_size_per_rank": 64,
                  "optimizer": {"lr": 5.0e-4, "clip_grad": 1.0, "lr_warmup_steps": 30,
                                "lr_decay_style": "cosine"}},
        "rollout": {"engine": "vllm", "num_gpus": 1, "temperature": 1.0, "top_p": 0.9,
                    "max_new_tokens": 40},
        "train": {"steps": RM_STEPS, "global_batch_size": 64, "max_seq_len": 64},
        "data": {"apply_chat_template": True, "max_prompt_len": 24},
        "checkpoint": {"save_every": 0},
        "logging": {"progress_bar": False},
    }
    set_dotted(job, over)
    return job


def _load(d: dict):
    from megarlhf.config import from_dict
    from megarlhf.planning import validate
    from megarlhf.config.schema import JobConfig

    return validate(from_dict(JobConfig, d))


@pytest.fixture(scope="module")
def orm_run(demo_run, tmp_path_factory):
    """The demo's ORM stage (megarlhf/demo/rm.yaml: 4000 prompts x 8 samples of the SFT model,
    800 steps) and a best-of-N evaluation of it on the 200 held-out prompts."""
    from megarlhf.controller.bon import eval_bon

    s = demo_run["summary"]
    rm = dict(s["rm_eval"], hf_dir=s["rm_hf"], step=RM_STEPS)
    root = tmp_path_factory.mktemp("orm")
    bon = eval_bon(_load(_job(demo_run, root / "bon", "bon", **{
        "reward_model": {"model": {"hf_dir": rm["hf_dir"], "dtype": "fp32"},
                         "parallel": {"tp": 2}, "num_gpus": 2,
                         "micro_batch_size_per_rank": 128},
        "reward.sources": {"rm": 1.0}, "data.eval_path": demo_run["prompts_heldout"],
        "bon.n_values": BON_N, "bon.temperature": 0.9})))
    return {"root": root, "data": s["rm_data"], "rm": rm, "bon": bon}


def test_orm_ranks_held_out_pairs(orm_run):
    """If this fails, the multi-task ORM (pairs + verifier-labelled samples in one batch) does
    not learn to rank a right answer above a wrong one on held-out prompts."""
    rm = orm_run["rm"]
    assert rm["step"] == RM_STEPS and os.path.isfile(os.path.join(rm["hf_dir"], "config.json"))
    # Pairs are a right and a wrong sample of the same prompt, so only the answer differs.
    # Chance is 0.5; measured 0.63 over ~750 held-out pairs (standard error 0.018), so 0.57 is
    # > 3 standard errors above chance. AUC over all labelled rows: measured 0.89.
    assert rm["rm/eval_pair_accuracy"] > 0.57, rm
    assert rm["rm/eval_binary_auc"] > 0.75, rm
    assert rm["rm/eval_chosen_reward"] > rm["rm/eval_rejected_reward"]
    # Evaluated twice (mid-run and at the end), logged under rm/ names.
    rows = read_metrics(os.path.dirname(rm["hf_dir"]))
    evals = [r for r in rows if "rm/eval_pair_accuracy" in r]
    assert [r["step"] for r in evals] == [RM_STEPS // 2, RM_STEPS]
    assert all("rm/loss" in r and "rm/pair_accuracy" in r for r in rows if "rm/loss" in r)
    cfg = json.load(open(os.path.join(rm["hf_dir"], "config.json")))
    assert cfg["architectures"][0].endswith("ForSequenceClassification")


def test_orm_best_of_n_rises_with_n(orm_run):
    """If this fails, picking the ORM's favourite of N samples no longer beats a single sample:
    the RM does not rank the policy's own samples (or best-of-N picks the wrong one)."""
    bon = orm_run["bon"]
    c = bon["curve"]
    assert bon["num_prompts"] == 200 and bon["samples_per_prompt"] == 16
    # N = 1 is the single-sample accuracy, over all 200 x 16 samples.
    assert c[1]["accuracy"] == c[1]["mean"] == c[16]["mean"]
    # Measured (disjoint groups: 3200 trials at N=1, 800 at N=4, 400 at N=8):
    # N = 1, 2, 4, 8, 16 -> 0.457, 0.477, 0.511, 0.510, 0.505 (oracle 0.457 ... 0.775).
    # The gain flattens at larger N, as a small RM's ranking errors start to be exploited.
    assert c[4]["accuracy"] > c[1]["accuracy"] + 0.02, c
    assert c[2]["accuracy"] > c[1]["accuracy"] and c[8]["accuracy"] > c[1]["accuracy"], c
    # The references behave as they must: pass@N grows with N and bounds every method.
    oracle = [c[n]["oracle"] for n in BON_N]
    assert oracle == sorted(oracle) and oracle[-1] > oracle[0] + 0.2
    for n in BON_N:
        assert c[n]["accuracy"] <= c[n]["oracle"] and c[n]["majority"] <= c[n]["oracle"]
    saved = json.load(open(bon["path"]))
    assert saved["curve"]["4"]["accuracy"] == c[4]["accuracy"]
    rows = read_metrics(os.path.dirname(bon["path"]))
    assert any("bon/accuracy@16" in r for r in rows)
    assert sorted(r["step"] for r in rows if "bon/accuracy" in r) == BON_N


def test_prm_step_labels_from_a_real_policy_equal_rollout_fractions(demo_run, tmp_path):
    """If this fails, automatic PRM labels with a real policy (prefix tokenization, seeded
    rollouts on the rollout group, decoding, verification) are not the fraction of that
    policy's rollouts from each prefix that reach the right answer."""
    from megarlhf.controller.rm_data import (
        label_steps_with_policy,
        policy_rollout,
        policy_tokenizer,
    )
    from megarlhf.rewards.prm_labels import StepExample, step_prefixes
    from megarlhf.data.demo_task import ArithmeticTask
    from megarlhf.rollout.base import SamplingParams

    job = _load(_job(demo_run, tmp_path / "prm", "rm", **{
        "reward.rm_type": "prm", "data.labelled_path": "unused",
        "reward.prm_label_rollouts": 8}))
    tok = policy_tokenizer(job, demo_run["sft_hf"])
    task = ArithmeticTask()
    right = "7*3=21\n12+21=33\nanswer: 33"
    wrong = "7*3=24\n12+24=36\nanswer: 36"  # wrong from step 1 on
    pids = tok.apply_chat_template([{"role": "user", "content": "12+7*3="}])
    examples = [StepExample(pids, right, "33"), StepExample(pids, wrong, "33")]
    K = 8
    with policy_rollout(job, demo_run["sft_hf"], max_prompt_len=64) as group:
        labels = label_steps_with_policy(job, tok, examples, policy_hf_dir=demo_run["sft_hf"],
                                         k=K, rollout=group)
        # The same seeded requests, decoded and checked here with the task's own checker.
        prefixes = [p for ex in examples for p in step_prefixes(ex.response, "\n")[:-1]]
        r = job.rollout
        outs = group.generate([pids + tok.encode(p) for p in prefixes], SamplingParams(
            n=K, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            max_new_tokens=r.max_new_tokens, stop_token_ids=(tok.eos_id,),
            seed=job.seed * 1_000_003 + 7, logprobs=False))
    fractions = [sum(task.is_correct(p + tok.decode(s.token_ids), 33) for s in o.samples) / K
                 for p, o in zip(prefixes, outs)]
    assert labels == [(fractions[0], fractions[1], 1.0), (fractions[2], fractions[3], 0.0)]
    # A prefix with a wrong step cannot be completed to the right answer.
    assert fractions[2] == fractions[3] == 0.0
    assert fractions[1] > 0  # after two right steps the policy can write the answer


def test_prm_trains_on_automatic_step_labels(demo_run, tmp_path):
    """If this fails, `train rm` with reward.rm_type=prm and automatic step labels does not run
    end to end (label with policy rollouts, cache, per-step loss, export), or the cached labels
    are not reused."""
    from megarlhf.controller.rm import train_rm
    from megarlhf.data.datasets import read_records, write_jsonl

    # 48 of the demo's verifier-labelled SFT samples (they carry the ground-truth answer).
    rows = [rec for _, rec in read_records(demo_run["summary"]["rm_data"]["labelled"])][:48]
    path = str(write_jsonl(tmp_path / "labelled.jsonl", rows))
    over = {"reward.rm_type": "prm", "reward.prm_label_rollouts": 4,
            "reward.prm_label_type": "hard", "reward.prm_aggregation": "min",
            "data.labelled_path": path, "train.steps": 6, "train.global_batch_size": 16,
            "actor.micro_batch_size_per_rank": 16}
    out = train_rm(_load(_job(demo_run, tmp_path / "prm", "rm", **over)))
    assert out["step"] == 6 and os.path.isfile(os.path.join(out["hf_dir"], "config.json"))
    cache = json.load(open(tmp_path / "prm" / "prm_step_labels.json"))
    labels = cache["labels"]
    assert len(labels) == len(rows)
    for lab, row in zip(labels, rows):
        steps = row["response"].count("\n") + 1
        assert len(lab) == steps and lab[-1] == float(row["label"])  # final step = outcome
        assert all(x in (0.0, 0.25, 0.5, 0.75, 1.0) for x in lab)  # fractions of K = 4
    metrics = read_metrics(str(tmp_path / "prm"))
    assert all("rm/loss_step" in r and "rm/step_accuracy" in r for r in metrics if "rm/loss" in r)
    assert len([r for r in metrics if "rm/loss" in r]) == 6
    # Same settings, new run in the same directory (replacing the first: checkpoint.overwrite):
    # the labels are read back, not recomputed.
    t = os.path.getmtime(tmp_path / "prm" / "prm_step_labels.json")
    train_rm(_load(_job(demo_run, tmp_path / "prm", "rm", **dict(over, **{
        "train.steps": 1, "checkpoint.overwrite": True}))))
    assert os.path.getmtime(tmp_path / "prm" / "prm_step_labels.json") == t
