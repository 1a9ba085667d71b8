"""The RL driver's glue, without Ray: rollouts into batches (behaviour log-probs present or
absent), reward processing + advantages per estimator against hand-computed values, the
mini-batch slicing of the update, and which log-probs become logp_old."""

import math
from types import SimpleNamespace

import pytest
import torch

from megarlhf.config import JobConfig, from_dict
from megarlhf.config.schema import AlgorithmConfig
from megarlhf.controller.experience import build_rollout, compute_advantages, minibatches
from megarlhf.controller.rl import RLTrainer
from megarlhf.data.job_data import PromptItem
from megarlhf.engine.batch import TokenBatch
from megarlhf.engine.loss_fns import PolicyLossSpec, ValueLossSpec
from megarlhf.models.tiny import tiny_arch
from megarlhf.rl import aggregate_normalizer
from megarlhf.rollout.base import RolloutOutput, Sample

pytestmark = pytest.mark.unit

# Four responses, two prompts (N = 2): response tokens are where the mask is 1.
MASK = torch.tensor([[0, 1, 1, 0],
                     [0, 1, 1, 1],
                     [0, 0, 1, 0],
                     [0, 1, 1, 0]], dtype=torch.float32)
RAW = torch.tensor([1.0, 0.0, 2.0, 2.0])


def _batch(**fields):
    return TokenBatch(torch.ones(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.bool),
                      {"response_mask": MASK.clone(), **fields})


def _adv(estimator, raw=RAW, **algo):
    a = AlgorithmConfig(**{"reward_norm_eps": 1e-12, **algo})
    return compute_advantages(_batch(), raw, a, estimator, 2, **algo_inputs(estimator))


def algo_inputs(estimator):
    return {"values": torch.zeros(4, 4)} if estimator == "gae" else {}


def _per_row(seq):
    """A sequence value broadcast to the response tokens."""
    return torch.tensor(seq)[:, None] * MASK


@pytest.mark.parametrize("estimator,seq", [
    ("grpo", [1.0, -1.0, 0.0, 0.0]),     # (r - mean) / std per prompt; equal rewards -> 0
    ("dr_grpo", [0.5, -0.5, 0.0, 0.0]),  # no std division
    ("rloo", [1.0, -1.0, 0.0, 0.0]),     # r_i - mean of the other N - 1
    ("gae", [1.0, -1.0, 0.0, 0.0]),      # gamma = lam = 1, V = 0: the return, on every token
])
def test_compute_advantages_by_hand(estimator, seq):
    """If this fails, an estimator's reward processing or broadcast to tokens changed, masked
    positions carry advantage, or the reward metrics are wrong."""
    fields, m = _adv(estimator, lam=1.0)
    torch.testing.assert_close(fields["advantages"], _per_row(seq))
    torch.testing.assert_close(fields["processed_reward"],
                               torch.tensor(seq) if estimator != "dr_grpo"
                               else torch.tensor([0.5, -0.5, 0.0, 0.0]))
    assert m["reward/raw_mean"] == 1.25
    assert m["reward/raw_std"] == pytest.approx(float(RAW.std(unbiased=False)))
    assert m["reward/normalized_mean"] == pytest.approx(sum(seq) / 4)
    assert "policy/kl_ref" not in m  # no reference log-probs given


def test_reinforce_pp_normalizes_returns_over_the_batch():
    """If this fails, REINFORCE++ does not whiten its token returns over the whole batch."""
    fields, _ = _adv("reinforce_pp")
    # Returns-to-go of the group-normalized rewards [1, -1, 0, 0] (gamma 1) on each token:
    # [1, 1], [-1, -1, -1], [0], [0, 0]; mean -1/8, population variance 5/8 - 1/64.
    g = _per_row([1.0, -1.0, 0.0, 0.0])
    want = (g + 0.125) / math.sqrt(5 / 8 - 1 / 64) * MASK
    torch.testing.assert_close(fields["advantages"], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(fields["returns"], g)


def test_gae_with_values_and_kl_in_reward():
    """If this fails, GAE does not see the critic's values, or the KL penalty is not folded into
    the token rewards (kl_in_reward) / its metric is wrong."""
    a = AlgorithmConfig(reward_norm_eps=1e-12, kl_coef=0.5, kl_in_reward=True, kl_estimator="k1",
                        lam=1.0)
    logp_ref = torch.zeros(4, 4)
    logp = torch.full((4, 4), 0.1)  # k1 = 0.1 on every token
    values = torch.full((4, 4), 0.5)
    fields, m = compute_advantages(_batch(), RAW, a, "gae", 2, values=values, logp=logp,
                                   logp_ref=logp_ref)
    # gamma = lam = 1: A_t = (sum of token rewards from t on) - V_t; rewards -0.05 per token
    # plus the sequence reward on the last token.
    seq, lengths = [1.0, -1.0, 0.0, 0.0], [2, 3, 1, 2]
    want = torch.zeros(4, 4)
    for b, (r, n) in enumerate(zip(seq, lengths)):
        pos = MASK[b].nonzero().flatten().tolist()
        for k, t in enumerate(pos):
            want[b, t] = r - 0.05 * (n - k) - 0.5
    torch.testing.assert_close(fields["advantages"], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(fields["returns"], (want + 0.5) * MASK, atol=1e-6, rtol=0)
    assert m["policy/kl_ref"] == pytest.approx(0.1)


def test_grpo_kl_in_reward_adds_the_penalty_to_go():
    """If this fails, critic-free estimators lose the KL penalty with kl_in_reward."""
    a = AlgorithmConfig(reward_norm_eps=1e-12, kl_coef=0.5, kl_in_reward=True, kl_estimator="k1")
    fields, _ = compute_advantages(_batch(), RAW, a, "grpo", 2, logp=torch.full((4, 4), 0.1),
                                   logp_ref=torch.zeros(4, 4))
    lengths = [2, 3, 1, 2]
    want = _per_row([1.0, -1.0, 0.0, 0.0])
    for b, n in enumerate(lengths):
        pos = MASK[b].nonzero().flatten().tolist()
        for k, t in enumerate(pos):
            want[b, t] -= 0.05 * (n - k)
    torch.testing.assert_close(fields["advantages"], want, atol=1e-6, rtol=0)
    # Without kl_in_reward the KL goes to the loss instead: advantages untouched.
    a2 = AlgorithmConfig(reward_norm_eps=1e-12, kl_coef=0.5, kl_estimator="k1")
    f2, _ = compute_advantages(_batch(), RAW, a2, "grpo", 2, logp=torch.full((4, 4), 0.1),
                               logp_ref=torch.zeros(4, 4))
    torch.testing.assert_close(f2["advantages"], _per_row([1.0, -1.0, 0.0, 0.0]))


def test_reward_processing_order_clip_normalize_shrink():
    """If this fails, reward processing no longer runs clip -> normalize -> shrink (methods.md
    2.2), or whitening of critic-free advantages is skipped."""
    fields, m = _adv("grpo", raw=torch.tensor([3.0, -3.0, 0.5, 0.5]), reward_clip=1.0,
                     negative_reward_scale=0.5)
    torch.testing.assert_close(fields["processed_reward"], torch.tensor([1.0, -0.5, 0.0, 0.0]))
    fields, _ = _adv("grpo", whiten_advantages=True)
    adv = fields["advantages"][MASK.bool()]
    assert abs(float(adv.mean())) < 1e-6 and float(adv.std(unbiased=False)) == pytest.approx(1)


# ------------------------------------------------------------------ mini-batches
def test_minibatches_slice_whole_prompt_groups_per_epoch():
    """If this fails, an update step mixes the samples of a prompt across steps, skips or
    repeats rows within an epoch, or the epochs are not full passes."""
    got = minibatches(8, 4, epochs=2)
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]]
    N = 2
    for rows in minibatches(12, 2 * N):  # train_prompts = 2, N = 2
        assert {r // N for r in rows} == {rows[0] // N, rows[-1] // N}  # whole groups
    with pytest.raises(ValueError, match="mini-batches"):
        minibatches(10, 4)


class FakeGroup:
    """A trained role: records each mini-batch it is given."""

    def __init__(self, name):
        self.name, self.calls = name, []

    def train(self, batch, spec):
        self.calls.append((batch.fields["row"].tolist(), spec))
        k = len(self.calls)
        return SimpleNamespace(metrics={"loss": float(k), "clip_frac": 0.1 * k}, grad_norm=k,
                               lr=1e-3)

    def forward(self, batch, temperature=1.0):
        self.calls.append(("forward", batch.batch_size))
        return {"logp": torch.full(batch.input_ids.shape, -0.5),
                "values": torch.zeros(batch.input_ids.shape)}


class FakeCluster(dict):
    def activate(self, *names):
        pass


def _rl_job(**over):
    d = {"kind": "ppo", "actor": {"model": {"arch": tiny_arch("llama")}},
         "critic": {"num_gpus": 1},
         "batch": {"rollout_prompts_global": 4, "train_prompts_global": 2,
                   "n_samples_per_prompt": 2},
         "algorithm": {"ppo_epochs": 2, "kl_coef": 0.1, "kl_in_reward": True}}
    for k, v in over.items():
        d.setdefault(k, {}).update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return from_dict(JobConfig, d)


def _trainer(job):
    t = RLTrainer.__new__(RLTrainer)  # the phases alone: no tokenizer, data or session
    t.job, t.N, t.temperature = job, job.batch.n_samples_per_prompt, 1.0
    t.kl_coef = job.algorithm.kl_coef
    t.agent = None  # single-turn rollouts
    t.session = SimpleNamespace(log_line=lambda line: None)
    return t


def test_policy_update_slices_the_rollout_into_optimizer_steps():
    """If this fails, the update does not take rollout_prompts / train_prompts optimizer steps
    per epoch on consecutive whole-prompt slices (critic before actor), normalizes a step's loss
    over the wrong tokens, or averages the steps' metrics wrongly."""
    job = _rl_job()
    B, S = 8, 5
    mask = torch.zeros(B, S)
    for b in range(B):
        mask[b, 1:2 + b % 3] = 1
    batch = TokenBatch(torch.ones(B, S, dtype=torch.long), torch.ones(B, S, dtype=torch.bool),
                       {"response_mask": mask, "row": torch.arange(B)})
    cl = FakeCluster(actor=FakeGroup("actor"), critic=FakeGroup("critic"))
    m = _trainer(job).train_policy(cl, batch)
    want_rows = [[0, 1, 2, 3], [4, 5, 6, 7]] * 2  # 2 epochs x (4 prompts / 2) steps
    assert [rows for rows, _ in cl["actor"].calls] == want_rows
    assert [rows for rows, _ in cl["critic"].calls] == want_rows
    for rows, spec in cl["actor"].calls:
        assert isinstance(spec, PolicyLossSpec)
        sub = mask[rows].bool()
        assert spec.num_tokens == float(sub.sum())
        assert spec.normalizer == float(aggregate_normalizer(sub, "token_mean"))
        assert spec.kl_coef == 0.0  # kl_in_reward: the KL is in the advantages, not the loss
    assert all(isinstance(s, ValueLossSpec) for _, s in cl["critic"].calls)
    assert m["policy/loss"] == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert m["policy/clip_frac"] == pytest.approx(0.25)
    assert m["critic/value_loss"] == pytest.approx(2.5) and m["policy/lr"] == 1e-3


# ------------------------------------------------------------------ behaviour log-probs
def _outputs(logprobs):
    return [RolloutOutput((5, 6), (Sample((7, 2), lp, "stop"), Sample((8, 9), lp, "length")))
            for lp in logprobs]


class Tok:
    pad_id, eos_id = 0, 2

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_rollout_carries_behaviour_logprobs_only_when_the_engine_gave_them():
    """If this fails, missing behaviour log-probs are stored as zeros again (and a stale
    learner silently stands in for the behaviour policy), or partial ones pass."""
    prompts = [PromptItem(ids=[5, 6]), PromptItem(ids=[5, 6])]
    with_lp = build_rollout(prompts, _outputs([(-0.1, -0.2), (-0.3, -0.4)]), Tok())
    lp = with_lp.behaviour_logprobs
    assert lp is not None
    torch.testing.assert_close(lp[:, 2:], torch.tensor([[-0.1, -0.2], [-0.1, -0.2],
                                                        [-0.3, -0.4], [-0.3, -0.4]]))
    assert with_lp.batch.fields["truncated"].tolist() == [False, True, False, True]
    assert with_lp.responses == ["7 2", "8 9", "7 2", "8 9"]
    assert all(p is prompts[i] for p, i in zip(with_lp.sample_prompts, [0, 0, 1, 1]))
    without = build_rollout(prompts, _outputs([None, None]), Tok())
    assert without.behaviour_logprobs is None
    assert "logp_behaviour" not in without.batch.fields
    with pytest.raises(ValueError, match="log-probs for 2 of 4"):
        build_rollout(prompts, _outputs([(-0.1, -0.2), None]), Tok())


def _annotated(job, logp_behaviour):
    fields = {"response_mask": MASK.clone()}
    if logp_behaviour is not None:
        fields["logp_behaviour"] = logp_behaviour
    batch = TokenBatch(torch.ones(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.bool),
                       fields)
    cl = FakeCluster(actor=FakeGroup("actor"))
    m = _trainer(job).annotate(cl, batch)
    return batch, m, cl["actor"].calls


def test_logp_old_is_the_behaviour_policys_when_asked_and_never_a_stand_in():
    """If this fails, use_behaviour_logprobs / tis_cap train with the wrong logp_old, or a run
    that needs behaviour log-probs silently uses the learner's instead."""
    grpo = {"kind": "grpo", "critic": None, "algorithm": {"kl_coef": 0.0, "track_kl": False}}
    lp = torch.full((4, 4), -0.5)
    # Default: the learner's own log-probs; the engine's are compared with them.
    batch, m, calls = _annotated(_rl_job(**grpo), lp)
    assert calls == [("forward", 4)] and torch.equal(batch.fields["logp_old"], lp)
    assert m["rollout/logprob_diff_max"] == 0.0
    # use_behaviour_logprobs: the engine's, and the actor re-scores only a probe.
    job = _rl_job(**{**grpo, "algorithm": {**grpo["algorithm"], "use_behaviour_logprobs": True},
                     "rollout": {"logprob_check_samples": 2}})
    beh = torch.full((4, 4), -0.25)
    batch, m, calls = _annotated(job, beh)
    assert batch.fields["logp_old"] is beh and calls == [("forward", 2)]
    assert m["rollout/logprob_diff_max"] == pytest.approx(0.25)
    with pytest.raises(RuntimeError, match="engine returned none"):
        _annotated(job, None)
    # tis_cap: logp_old is the learner's (the weight corrects from the behaviour policy).
    job = _rl_job(**{**grpo, "algorithm": {**grpo["algorithm"], "tis_cap": 2.0}})
    batch, _, calls = _annotated(job, beh)
    assert calls == [("forward", 4)] and torch.equal(batch.fields["logp_old"], lp)
    with pytest.raises(RuntimeError, match="tis_cap"):
        _annotated(job, None)


# ------------------------------------------------------------------ methods of docs/methods.md
def test_compute_advantages_uses_the_batchs_groups_of_any_size():
    """If this fails, the driver's advantages assume N consecutive samples per prompt when the
    batch says otherwise (a prompt that kept only some samples)."""
    prompt_index = torch.tensor([0, 0, 0, 1])  # 3 samples of prompt 0, 1 of prompt 1
    a = AlgorithmConfig(reward_norm_eps=1e-12)
    batch = _batch(prompt_index=prompt_index)
    fields, _ = compute_advantages(batch, RAW, a, "grpo", 2)
    r = RAW[:3]
    want = ((r - r.mean()) / r.std(unbiased=False)).tolist() + [0.0]  # a group of one: 0
    torch.testing.assert_close(fields["advantages"], _per_row(want))
    fields, _ = compute_advantages(batch, RAW, a, "rloo", 2)
    want = [1.0 - 1.0, 0.0 - 1.5, 2.0 - 0.5, 0.0]
    torch.testing.assert_close(fields["advantages"], _per_row(want))


def test_reinforce_pp_baseline_unbiased_std_and_kl_coef_override():
    """If this fails, REINFORCE++-baseline, unbiased_std or the adaptive controller's KL
    coefficient do not reach the advantages."""
    fields, _ = _adv("reinforce_pp_baseline")
    # Group means subtracted (no std): [0.5, -0.5, 0, 0], returns-to-go then batch whitening.
    g = _per_row([0.5, -0.5, 0.0, 0.0])
    v = g[MASK.bool()]
    want = (g - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-8) * MASK
    torch.testing.assert_close(fields["advantages"], want, atol=1e-6, rtol=0)
    f1, _ = _adv("grpo", unbiased_std=True)
    torch.testing.assert_close(f1["advantages"], _per_row([1, -1, 0, 0]) / math.sqrt(2))
    a = AlgorithmConfig(reward_norm_eps=1e-12, kl_coef=0.5, kl_in_reward=True,
                        kl_estimator="k1")
    kw = dict(logp=torch.full((4, 4), 0.1), logp_ref=torch.zeros(4, 4))
    f2, _ = compute_advantages(_batch(), RAW, a, "grpo", 2, kl_coef=0.0, **kw)
    torch.testing.assert_close(f2["advantages"], _per_row([1.0, -1.0, 0.0, 0.0]))


@pytest.mark.parametrize("algo", [{"tis_cap": 2.0},
                                  {"off_policy_correction": "seq_tis", "is_upper": 3.0},
                                  {"off_policy_correction": "token_mis"},
                                  {"off_policy_correction": "seq_mis", "is_lower": 0.5},
                                  {"off_policy_correction": "icepop"}])
def test_annotate_computes_off_policy_weights_from_the_proximal_policy(algo):
    """If this fails, an off-policy correction weights with the wrong log-probs (they must be
    the learner's before the update vs the engine's), the wrong bounds, or logs nothing."""
    grpo = {"kind": "grpo", "critic": None,
            "algorithm": {"kl_coef": 0.0, "track_kl": False, "use_behaviour_logprobs": True,
                          **algo}}
    job = _rl_job(**grpo)
    beh = torch.full((4, 4), -0.5) + 0.3 * MASK * torch.tensor([1.0, -1.0, 2.0, 0.0])[:, None]
    batch, m, calls = _annotated(job, beh)
    assert calls == [("forward", 4)]  # the learner scores the whole batch: logp_old
    torch.testing.assert_close(batch.fields["logp_old"], torch.full((4, 4), -0.5))
    corr = job.algorithm.off_policy()
    lower, upper = job.algorithm.off_policy_bounds()
    from megarlhf.rl import off_policy_weights

    want, _ = off_policy_weights(torch.full((4, 4), -0.5), beh, MASK, corr, upper=upper,
                                 lower=lower)
    torch.testing.assert_close(batch.fields["is_weights"], want)
    for k in ("weight_mean", "weight_std", "masked_frac", "truncated_frac", "ratio_max",
              "mismatch_kl"):
        assert f"offpolicy/{k}" in m
    assert (job.algorithm.off_policy_bounds() == (0.5, 5.0)) == (corr == "icepop")


def test_policy_update_passes_the_method_and_slices_unequal_groups():
    """If this fails, the actor trains with another policy loss than configured, without the
    off-policy weights, with a stale KL coefficient, or splits a prompt's samples over
    optimizer steps."""
    job = _rl_job(kind="grpo", critic=None, algorithm={
        "ppo_epochs": 1, "kl_coef": 0.1, "kl_in_reward": False, "policy_loss": "cispo",
        "loss_agg_mode": "token_sum", "kl_estimator": "k3+"})
    B, S = 7, 4
    mask = torch.ones(B, S)
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 3])  # 4 prompts, 2 per step
    batch = TokenBatch(torch.ones(B, S, dtype=torch.long), torch.ones(B, S, dtype=torch.bool),
                       {"response_mask": mask, "row": torch.arange(B), "prompt_index": groups,
                        "is_weights": torch.ones(B, S)})
    cl = FakeCluster(actor=FakeGroup("actor"))
    t = _trainer(job)
    t.kl_coef = 0.37  # the adaptive controller's current value
    t.train_policy(cl, batch)
    assert [rows for rows, _ in cl["actor"].calls] == [[0, 1, 2, 3], [4, 5, 6]]
    for _, spec in cl["actor"].calls:
        assert spec.loss_type == "cispo" and spec.use_is_weights and spec.kl_coef == 0.37
        assert spec.agg_mode == "token_sum" and spec.kl_estimator == "k3+"


def test_group_minibatches():
    """If this fails, optimizer steps no longer hold whole prompt groups of any size."""
    from megarlhf.controller.experience import group_minibatches

    assert group_minibatches([5, 5, 1, 1, 1, 9, 2], 2, epochs=2) == \
        [[0, 1, 2, 3, 4], [5, 6]] * 2
    assert group_minibatches(list(torch.arange(8) // 2), 2) == minibatches(8, 4)
    with pytest.raises(ValueError, match="3 prompt groups"):
        group_minibatches([0, 1, 2], 2)


def test_adaptive_kl_coefficient_updates_logs_and_is_saved():
    """If this fails, the adaptive KL controller does not follow the measured KL, the step does
    not log the coefficient it used, or a resumed run restarts from the initial one."""
    job = _rl_job(kind="grpo", critic=None,
                  algorithm={"kl_coef": 0.1, "kl_target": 0.05, "kl_horizon": 100})
    t = _trainer(job)
    m = t.update_kl_coef({"policy/kl_ref": 1.0}, samples=10)
    assert m == {"policy/kl_coef": 0.1} and t.kl_coef == pytest.approx(0.1 * 1.02)
    t.kl_coef = 0.2
    t.sampler, t.position, t.async_state, t.history = SimpleNamespace(
        state_dict=lambda: {}, load_state_dict=lambda s: None), None, None, {"eval": []}
    state = t.state_dict()
    t2 = _trainer(job)
    t2.sampler, t2.history = t.sampler, {}
    t2.load_state_dict(state)
    assert t2.kl_coef == 0.2
    fixed = _trainer(_rl_job(kind="grpo", critic=None, algorithm={"kl_coef": 0.1}))
    fixed.update_kl_coef({"policy/kl_ref": 1.0}, samples=10)
    assert fixed.kl_coef == 0.1


def _scripted_trainer(job, rewards_of_prompt):
    """A trainer whose generation gives each prompt 2 samples and whose rewards are scripted
    per prompt (prompt ids [p])."""
    from megarlhf.observability import PhaseTimer

    t = _trainer(job)
    t.tokenizer = Tok()
    t.session = SimpleNamespace(log_line=lambda line: None, timer=PhaseTimer())
    queue = [PromptItem(ids=[p]) for p in range(100)]
    t.drawn, t.rounds = [], []

    def next_prompts(count=None):
        out = [queue.pop(0) for _ in range(count)]
        t.drawn.append([p.ids[0] for p in out])
        return out

    def generate(cl, prompts, step, round=0):
        t.rounds.append(round)
        outs = [RolloutOutput(tuple(p.ids), (Sample((7, p.ids[0]), None, "stop"),
                                              Sample((8, p.ids[0]), None, "stop")))
                for p in prompts]
        return build_rollout(prompts, outs, Tok())

    def rewards(cl, rollout):
        r = torch.tensor([rewards_of_prompt[p.ids[0]][i % 2]
                          for i, p in enumerate(rollout.sample_prompts)])
        return r, {"reward/math_mean": float(r.mean())}

    t.next_prompts, t.generate, t.rewards = next_prompts, generate, rewards
    return t


def test_dynamic_sampling_refills_from_further_generations():
    """If this fails, DAPO dynamic sampling keeps tied prompts, does not refill from the next
    prompts with the round's own seed, does not stop after its rounds, or logs wrong counts."""
    tied, mixed = (1.0, 1.0), (1.0, 0.0)
    script = {0: tied, 1: mixed, 2: tied, 3: mixed, 4: tied, 5: mixed, 6: tied, 7: tied,
              8: tied}
    job = _rl_job(kind="grpo", critic=None, batch={"rollout_prompts_global": 3,
                                                   "train_prompts_global": 3},
                  algorithm={"dynamic_sampling": True, "dynamic_sampling_max_rounds": 2})
    t = _scripted_trainer(job, script)
    first = t.generate(None, t.next_prompts(3), 5)
    merged, (raw, m) = t.refill(None, first, t.rewards(None, first), 5)
    # Round 1 keeps prompt 1 of 3; the kept fraction 1/3 asks for 2 * 3 = 6 -> capped at 3.
    assert t.drawn == [[0, 1, 2], [3, 4, 5]] and t.rounds == [0, 1]
    assert [p.ids[0] for p in merged.prompts] == [1, 3, 5]
    assert raw.tolist() == [1.0, 0.0] * 3
    assert merged.batch.fields["prompt_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert m["rollout/ds_rounds"] == 2 and m["rollout/ds_prompts_drawn"] == 6
    assert m["rollout/ds_kept_frac"] == 0.5 and m["rollout/ds_filled_prompts"] == 0
    assert m["reward/math_mean"] == pytest.approx(9 / 12)  # over all 12 samples drawn

    # Out of rounds: what is missing is filled with dropped (tied) prompts.
    job0 = _rl_job(kind="grpo", critic=None, batch={"rollout_prompts_global": 3,
                                                    "train_prompts_global": 3},
                   algorithm={"dynamic_sampling": True, "dynamic_sampling_max_rounds": 0})
    t = _scripted_trainer(job0, script)
    first = t.generate(None, t.next_prompts(3), 0)
    merged, (raw, m) = t.refill(None, first, t.rewards(None, first), 0)
    assert [p.ids[0] for p in merged.prompts] == [1, 0, 2] and t.rounds == [0]
    assert m["rollout/ds_filled_prompts"] == 2 and m["rollout/ds_rounds"] == 1


def test_overlong_shaping_of_the_raw_reward():
    """If this fails, DAPO's soft overlong punishment does not reach the reward the advantages
    are computed from, or its metrics are missing."""
    job = _rl_job(kind="grpo", critic=None, rollout={"max_new_tokens": 4},
                  algorithm={"overlong_buffer": 2, "overlong_penalty": 0.5})
    t = _trainer(job)
    t.reward_fn = lambda prompts, responses, env=None: (torch.ones(len(responses)), {})
    lengths = [[1] * 2, [1] * 3, [1] * 4, [1]]
    outs = [RolloutOutput((5,), tuple(Sample(tuple(ids), None, "stop") for ids in lengths))]
    rollout = build_rollout([PromptItem(ids=[5])], outs, Tok())
    raw, m = t.rewards(FakeCluster(), rollout)
    torch.testing.assert_close(raw, torch.tensor([1.0, 0.75, 0.5, 1.0]))
    assert m["reward/overlong_frac"] == 0.5
    assert m["reward/overlong_penalty_mean"] == pytest.approx(-0.75 / 4)
