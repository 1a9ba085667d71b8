"""Reward-model data on the driver: sequences, batch layout, data-scaling selection, writers,
held-out metrics, and the PRM loss spec's additivity over micro-batches."""

import json

import pytest
import torch

from megarlhf.config import ConfigError, JobConfig, from_dict
from megarlhf.controller.rm_data import build_rm_records, pair_up
from megarlhf.data.rm_datasets import (
    RMData,
    RMSequence,
    batch_composition,
    load_rm_data,
    make_rm_batch,
    subsample_by_prompt,
)
from megarlhf.data.datasets import (
    DatasetError,
    load_labelled_responses,
    load_preference_pairs,
    write_jsonl,
)
from megarlhf.data.demo_task import ArithmeticTask
from megarlhf.data.tokenizer import ChatTemplate, train_sentencepiece
from megarlhf.engine.batch import make_micro_batches
from megarlhf.engine.loss_fns import ORMLossSpec, PRMLossSpec, loss_needs, make_loss_fn
from megarlhf.models.tiny import tiny_arch
from megarlhf.rewards.reward_model import rm_eval_metrics
from megarlhf.rl import rm_losses as R


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    task = ArithmeticTask()
    texts = [p.prompt + p.solution for p in task.problems("train", 300, seed=0)]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "t", 64,
                               required_chars="0123456789+-*=answr: ",
                               chat_template=ChatTemplate.plain())


def rm_job(tmp_path, tok, **data):
    d = {"kind": "rm", "output_dir": str(tmp_path / "out"),
         "cluster": {"gpus_per_node": 2, "device": "cpu"},
         "actor": {"model": {"arch": tiny_arch("llama"), "tokenizer": str(tok.model_file)},
                   "micro_batch_size_per_rank": 4},
         "train": {"global_batch_size": 8, "max_seq_len": 64},
         "reward": {"rm_type": data.pop("rm_type", "orm")},
         "data": {"labelled_path": "x.jsonl", **data}}
    return from_dict(JobConfig, d)


def test_batch_composition():
    """If this fails, RM batches are not gbs sequences, lose a kind, or mis-split pairs."""
    assert batch_composition(8, 0, 100) == (0, 8)
    assert batch_composition(8, 100, 0) == (4, 0)
    assert batch_composition(16, 100, 200) == (4, 8)  # pairs are 200 of 400 sequences
    assert batch_composition(8, 100, 200, preference_fraction=0.75) == (3, 2)
    assert batch_composition(8, 1, 10_000) == (1, 6)  # both kinds stay in every batch
    assert batch_composition(8, 10_000, 1) == (3, 2)
    with pytest.raises(ConfigError):
        batch_composition(2, 5, 5)


def test_make_rm_batch_layout():
    """If this fails, pairs are not adjacent (chosen, rejected), kinds/labels are misaligned, the
    score is not read at the EOS, or PRM step positions land on the wrong tokens."""
    c = RMSequence([1, 5, 6, 2])
    r = RMSequence([1, 5, 7, 8, 2])
    l1 = RMSequence([1, 9, 4, 9, 2], label=1, step_pos=(2, 4), step_labels=(0.5, 1.0))
    l0 = RMSequence([1, 9, 2], label=0, step_pos=(2,), step_labels=(0.0,))
    b = make_rm_batch([(c, r)], [l1, l0], pad_id=0, prm=True)
    assert b.fields["kind"].tolist() == [R.KIND_CHOSEN, R.KIND_REJECTED, R.KIND_BINARY,
                                         R.KIND_BINARY]
    assert b.fields["label"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert b.fields["last_index"].tolist() == [3, 4, 4, 2]
    assert b.input_ids[torch.arange(4), b.fields["last_index"]].tolist() == [2, 2, 2, 2]
    sm = b.fields["step_mask"]
    assert sm[:2].sum() == 0  # pairs train through the outcome loss only
    assert sm[2].nonzero().flatten().tolist() == [2, 4]
    assert b.fields["step_labels"][2, [2, 4]].tolist() == [0.5, 1.0]
    assert "step_mask" not in make_rm_batch([(c, r)], [l1], 0, prm=False).fields


def test_subsample_by_prompt():
    """If this fails, the data-scaling knobs (distinct prompts, responses per prompt) keep the
    wrong rows or differ between runs."""
    groups = ["a", "b", "a", "c", "b", "a", "c"]
    assert subsample_by_prompt(groups, None, None, 0) == list(range(7))
    assert subsample_by_prompt(groups, None, 1, 0) == [0, 1, 3]
    keep = subsample_by_prompt(groups, 2, None, 0)
    assert len({groups[i] for i in keep}) == 2
    assert keep == subsample_by_prompt(groups, 2, None, 0)
    assert subsample_by_prompt(groups, 2, 2, 0, prompt_order=["c", "a", "b"]) == [0, 2, 3, 6]


def test_load_rm_data_sequences_and_errors(tmp_path, tok):
    """If this fails, RM sequences are not prompt + response + EOS, PRM steps are read at the
    wrong tokens, over-long rows pass, or rows without step labels silently train a PRM."""
    pairs = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "3+5=", "chosen": "3+5=8\nanswer: 8", "rejected": "3+5=7\nanswer: 7"}])
    lab = write_jsonl(tmp_path / "l.jsonl", [
        {"prompt": "3+5=", "response": "3+5=8\nanswer: 8", "label": 1, "step_labels": [1, 1]},
        {"prompt": "2*2=", "response": "2*2=5\nanswer: 5", "label": 0, "step_labels": [0, 0]}])
    job = rm_job(tmp_path, tok, rm_type="prm")
    data = load_rm_data(job, tok, str(pairs), str(lab), prm=True)
    pids = tok.apply_chat_template([{"role": "user", "content": "3+5="}])
    c, r = data.pairs[0]
    assert c.ids == pids + tok.encode("3+5=8\nanswer: 8") + [tok.eos_id]
    assert r.ids == pids + tok.encode("3+5=7\nanswer: 7") + [tok.eos_id]
    s = data.labelled[0]
    nl = tok.encode("\n")[-1]
    assert s.ids[s.step_pos[0]] == nl and s.step_pos[-1] == len(s.ids) - 1
    assert s.step_labels == (1.0, 1.0) and s.label == 1
    # No step labels and no automatic labelling: refused with the fix.
    lab2 = write_jsonl(tmp_path / "l2.jsonl", [
        {"prompt": "3+5=", "response": "3+5=8\nanswer: 8", "label": 1}])
    with pytest.raises(ConfigError, match="prm_label_rollouts"):
        load_rm_data(job, tok, None, str(lab2), prm=True)
    # ... unless a labeller supplies them.
    got = load_rm_data(job, tok, None, str(lab2), prm=True,
                       step_labeller=lambda rows: [(0.25, 1.0)] * len(rows))
    assert got.labelled[0].step_labels == (0.25, 1.0)
    # Over-long rows name the file, line and field.
    long = write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": "1+1=", "response": "1+1=2\n" * 30 + "answer: 2", "label": 1}])
    with pytest.raises(DatasetError, match="long.jsonl, line 1: field 'response'"):
        load_rm_data(job, tok, None, str(long), prm=False)


def test_writers_round_trip_through_loaders(tmp_path):
    """If this fails, the RM data written from a policy's samples does not load with the
    datasets loaders, or pairs are not (right, wrong) of the same prompt."""
    assert pair_up(["a", "b", "c", "d"], [1, 0, 1, 0]) == [(0, 1), (2, 3)]
    assert pair_up(["a", "a", "", "x"], [1, 0, 1, 0]) == []  # identical or empty texts
    assert pair_up(["a", "b", "c"], [1, 1, 0], max_pairs=1) == [(0, 2)]
    # Every combination, disjoint pairs first.
    assert pair_up(["a", "b", "c", "d", "e"], [1, 0, 1, 0, 0], all_pairs=True) == [
        (0, 1), (2, 3), (0, 3), (2, 4), (0, 4), (2, 1)]
    prompts = [{"id": "q1", "prompt": "1+1=", "answer": "2"},
               {"id": "q2", "messages": [{"role": "user", "content": "2+2="}], "answer": "4"}]
    responses = [["answer: 2", "answer: 3"], ["answer: 5", "answer: 4", "answer: 4"]]
    labels = [[1, 0], [0, 1, 1]]
    steps = [[(1.0,), (0.0,)], [(0.0,), (1.0,), (1.0,)]]
    lab, pairs = build_rm_records(prompts, responses, labels, step_labels=steps)
    lp = write_jsonl(tmp_path / "labelled.jsonl", lab)
    pp = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    rows = load_labelled_responses(lp)
    assert [(r.response, r.label, r.step_labels) for r in rows] == [
        ("answer: 2", 1, (1.0,)), ("answer: 3", 0, (0.0,)), ("answer: 5", 0, (0.0,)),
        ("answer: 4", 1, (1.0,)), ("answer: 4", 1, (1.0,))]
    assert json.loads(open(lp).readline())["answer"] == "2"
    prs = load_preference_pairs(pp)
    assert [(p.chosen, p.rejected) for p in prs] == [("answer: 2", "answer: 3"),
                                                      ("answer: 4", "answer: 5")]
    assert prs[1].prompt == ({"role": "user", "content": "2+2="},)


def test_rm_eval_metrics(tmp_path, tok):
    """If this fails, held-out pairwise accuracy, AUC or mean rewards are computed from the
    wrong positions or rows."""
    job = rm_job(tmp_path, tok)
    pairs = [(RMSequence([1, 2]), RMSequence([1, 2])) for _ in range(3)]
    lab = [RMSequence([1, 2], label=l) for l in (1, 0, 1, 0)]
    data = RMData(pairs, lab)
    last = [2.0, 1.0, 0.0, 1.0, 3.0, -1.0] + [1.0, -1.0, -2.0, 0.5]
    values = [torch.tensor([9.0, v]) for v in last]  # the score is read at the last token
    m = rm_eval_metrics(job, data, values)
    assert m["rm/eval_pair_accuracy"] == pytest.approx(2 / 3)
    assert m["rm/eval_chosen_reward"] == pytest.approx(5 / 3)
    assert m["rm/eval_rejected_reward"] == pytest.approx(1 / 3)
    assert m["rm/eval_binary_accuracy"] == pytest.approx(0.5)  # 1>0 right, -2 wrong, ...
    assert m["rm/eval_binary_auc"] == pytest.approx(0.5)  # pos {1,-2} vs neg {-1,0.5}


def test_prm_spec_with_pairs_sums_to_global():
    """If this fails, the PRM loss (steps + the pairs' outcome loss) depends on micro-batching,
    or labelled rows get an outcome BCE on top of their steps."""
    g = torch.Generator().manual_seed(0)
    c, r = RMSequence([1, 5, 6, 2]), RMSequence([1, 5, 7, 8, 2])
    labs = [RMSequence([1, 9, 4, 9, 2], label=1, step_pos=(2, 4), step_labels=(0.5, 1.0)),
            RMSequence([1, 9, 2], label=0, step_pos=(2,), step_labels=(0.0,))]
    b = make_rm_batch([(c, r), (r, c)], labs, 0, prm=True)
    values = torch.randn(b.input_ids.shape, generator=g) * b.attention_mask
    b.fields["values"] = values
    spec = PRMLossSpec(num_steps=float(b.fields["step_mask"].sum()), num_pairs=2.0)
    assert loss_needs(spec)["group_size"] == 2
    want_step, _ = R.prm_step_loss(values, b.fields["step_mask"], b.fields["step_labels"])
    scores = values[torch.arange(6), b.fields["last_index"]]
    want_pref = R.bradley_terry_loss(scores[[0, 2]], scores[[1, 3]])
    for split in (dict(micro_batch_size=2), dict(micro_batch_size=6),
                  dict(max_tokens=12, group_size=2)):
        fn = make_loss_fn(spec)
        total, acc = 0.0, 0.0
        for mb in make_micro_batches(b, **split):
            loss, m = fn({"values": mb.fields["values"]}, mb)
            total += float(loss)
            acc += float(m["pair_accuracy"])
        assert total == pytest.approx(float(want_step + want_pref), abs=1e-6)
        assert acc == pytest.approx(float(R.pairwise_accuracy(scores[[0, 2]], scores[[1, 3]])))
    # ORM on the same batch: binary rows are scored at the EOS.
    spec = ORMLossSpec(num_pairs=2.0, num_binary=2.0)
    fn = make_loss_fn(spec)
    total = sum(float(fn({"values": mb.fields["values"]}, mb)[0])
                for mb in make_micro_batches(b, micro_batch_size=2))
    want, _ = R.orm_multitask_loss(scores, b.fields["kind"], b.fields["label"])
    assert total == pytest.approx(float(want), abs=1e-6)
