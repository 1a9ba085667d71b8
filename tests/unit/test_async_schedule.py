"""The asynchronous schedule (megarlhf.controller.async_schedule) on a simulated clock.

Property tests over random generation / training / sync durations: if these fail, the async
trainer could train on weights older than asynchronous.max_staleness, K = 0 would no longer be
the synchronous loop, a sync could land in the middle of a generation or a training step, or
a larger K would stop buying throughput.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megarlhf.controller.async_schedule import (
    EVAL,
    GENERATE,
    SYNC,
    TRAIN,
    AsyncSchedule,
    StalenessError,
    Task,
    simulate,
)

pytestmark = pytest.mark.unit

durations = st.floats(min_value=0.0, max_value=5.0, allow_nan=False, allow_infinity=False)


@st.composite
def runs(draw, min_steps=1, max_steps=12):
    steps = draw(st.integers(min_steps, max_steps))
    gen = draw(st.lists(durations, min_size=steps, max_size=steps))
    train = draw(st.lists(durations, min_size=steps, max_size=steps))
    sync = draw(st.floats(min_value=0.0, max_value=1.0))
    eval_every = draw(st.sampled_from([0, 0, 1, 2, 3, 5]))
    eval_time = draw(st.floats(min_value=0.0, max_value=2.0))
    return steps, gen, train, sync, eval_every, eval_time


def _sim(run, K, **kw):
    steps, gen, train, sync, eval_every, eval_time = run
    return simulate(steps, K, lambda b: gen[b], lambda b: train[b], sync,
                    eval_every=eval_every, eval_time=eval_time, **kw)


def synchronous_order(steps, eval_every, start=0):
    """The synchronous loop: generate(b), train(b), sync; evaluation after its step's sync."""
    out = []
    for b in range(start, steps):
        out += [(GENERATE, b), (TRAIN, b)]
        last = b + 1
        due = eval_every and last % eval_every == 0
        if last < steps or due:
            out.append((SYNC, last))
        if due:
            out.append((EVAL, last))
    return out


@settings(max_examples=300, deadline=None)
@given(run=runs(), K=st.integers(0, 4), fixed=st.booleans())
def test_staleness_never_exceeds_K_and_every_batch_is_trained_once_in_order(run, K, fixed):
    steps = run[0]
    r = _sim(run, K, fixed=fixed)
    assert len(r.staleness) == steps
    assert all(0 <= s <= K for s in r.staleness)
    trained = [t.batch for _, _, t in r.trace if t.kind == TRAIN]
    generated = [t.batch for _, _, t in r.trace if t.kind == GENERATE]
    assert trained == list(range(steps))
    assert generated == list(range(steps))  # data order is kept
    # The version a generation used is what the last sync before it pushed.
    version = 0
    for _, _, t in r.trace:
        if t.kind == SYNC:
            version = t.version
        elif t.kind == GENERATE:
            assert t.version == version
            assert t.batch - version <= K


@settings(max_examples=300, deadline=None)
@given(run=runs(), K=st.integers(0, 4), fixed=st.booleans())
def test_resources_never_overlap_and_sync_lands_between_generations_and_steps(run, K, fixed):
    r = _sim(run, K, fixed=fixed)
    eps = 1e-9
    for role in ("learner", "rollout"):
        spans = sorted((s, e) for s, e, t in r.trace
                       if (t.uses_learner if role == "learner" else t.uses_rollout))
        for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
            assert s1 >= e0 - eps, f"two {role} tasks overlap"
    # An eval is a barrier: nothing else runs meanwhile.
    for s, e, t in r.trace:
        if t.kind == EVAL:
            assert not any(o is not t and o_s < e - eps and o_e > s + eps
                           for o_s, o_e, o in r.trace)


@settings(max_examples=300, deadline=None)
@given(run=runs(), K=st.integers(0, 4))
def test_learner_waits_only_for_data_or_its_own_sync(run, K):
    """Each training step starts as soon as its batch exists and the learner is free (the sync
    holds the learner no longer than the sync itself)."""
    r = _sim(run, K)
    gen_end = {t.batch: e for _, e, t in r.trace if t.kind == GENERATE}
    prev_end = 0.0
    for s, e, t in r.trace:
        if t.kind == TRAIN:
            assert s == pytest.approx(max(gen_end[t.batch], prev_end), abs=1e-9)
        if t.uses_learner or t.kind == EVAL:
            prev_end = max(prev_end, e)


@settings(max_examples=300, deadline=None)
@given(run=runs(), fixed=st.booleans())
def test_K0_is_the_synchronous_order(run, fixed):
    steps, gen, train, sync, eval_every, _ = run
    r = _sim(run, 0, fixed=fixed)
    assert r.order() == synchronous_order(steps, eval_every)
    assert r.staleness == [0] * steps
    expected = sum(gen) + sum(train) + sync * sum(1 for k, _ in r.order() if k == SYNC) + \
        run[5] * sum(1 for k, _ in r.order() if k == EVAL)
    assert r.makespan == pytest.approx(expected)


@settings(max_examples=300, deadline=None)
@given(run=runs(), K=st.integers(1, 4))
def test_async_is_never_slower_than_sync(run, K):
    # At every moment one side works, and an async run syncs at most as often as K = 0.
    assert _sim(run, K).makespan <= _sim(run, 0).makespan + 1e-9


@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 16), g=durations, t=durations, s=st.floats(0.0, 1.0),
       K=st.integers(0, 4))
def test_throughput_never_drops_as_K_grows_for_steady_timings(steps, g, t, s, K):
    def sim(k):
        return simulate(steps, k, lambda b: g, lambda b: t, s).makespan
    assert sim(K + 1) <= sim(K) + 1e-9


def test_throughput_grows_with_K_on_average_over_random_timings():
    """Greedy list scheduling has anomalies (hypothesis finds timings where K = 3 is slower
    than K = 2: a rollout busy with a short generation when the learner finishes misses the
    sync and waits a whole step), so for random timings the claim is about the mean."""
    import random

    rng = random.Random(0)
    mean = {}
    for K in range(4):
        rng.seed(0)
        total = 0.0
        for _ in range(200):
            gen = [rng.lognormvariate(0, 0.5) for _ in range(10)]
            train = [rng.lognormvariate(0, 0.5) for _ in range(10)]
            total += simulate(10, K, lambda b: gen[b], lambda b: train[b], 0.05).makespan
        mean[K] = total / 200
    assert mean[0] > 1.4 * mean[1]  # balanced sides: K = 1 nearly halves the time
    assert mean[1] > mean[2] > mean[3]


@settings(max_examples=200, deadline=None)
@given(run=runs(min_steps=2), K=st.integers(1, 4))
def test_async_is_strictly_faster_when_both_sides_take_time(run, K):
    steps, gen, train, sync, _, _ = run
    run = (steps, [g + 0.1 for g in gen], [t + 0.1 for t in train], sync, 0, 0.0)
    assert _sim(run, K).makespan < _sim(run, 0).makespan - 1e-9


def test_K1_overlaps_generation_with_training_one_step_off_policy():
    r = simulate(4, 1, lambda b: 1.0, lambda b: 1.0, 0.1)
    assert r.order() == [(GENERATE, 0), (GENERATE, 1), (TRAIN, 0), (SYNC, 1), (GENERATE, 2),
                         (TRAIN, 1), (SYNC, 2), (GENERATE, 3), (TRAIN, 2), (TRAIN, 3)]
    assert r.staleness == [0, 1, 1, 1]
    # 1 (gen 0) + 3 x max(gen, train) + 2 syncs + the last train: 5.2 vs 4 x 2 + 3 x 0.1 = 8.3.
    assert r.makespan == pytest.approx(5.2)
    assert simulate(4, 0, lambda b: 1.0, lambda b: 1.0, 0.1).makespan == pytest.approx(8.3)


def test_resume_starts_both_sides_at_the_saved_version():
    r = simulate(5, 1, lambda b: 1.0, lambda b: 1.0, 0.1, start=3)
    assert r.order() == [(GENERATE, 3), (GENERATE, 4), (TRAIN, 3), (TRAIN, 4)]
    assert r.staleness == [0, 1]
    assert simulate(5, 0, lambda b: 1.0, lambda b: 1.0, start=3).order() == \
        synchronous_order(5, 0, start=3)


@settings(max_examples=500, deadline=None)
@given(run=runs(), K=st.integers(0, 4), start=st.integers(0, 12))
def test_fixed_staleness_samples_every_batch_exactly_K_versions_before_it_is_trained(
        run, K, start):
    """If this fails, asynchronous.fixed_staleness does not control the off-policyness (the
    staleness study's x axis): batch b must be trained at staleness min(K, b - start) whatever
    the two sides' speeds, without a stall."""
    steps, gen, train, sync, _, _ = run
    start = min(start, steps)
    r = simulate(steps, K, lambda b: gen[b], lambda b: train[b], sync, start=start, fixed=True)
    assert r.staleness == [min(K, b - start) for b in range(start, steps)]


def test_fixed_staleness_holds_K_when_generation_is_the_slower_side():
    """Generation 3x slower than a step: the default syncs whenever both sides are free, so
    the staleness stays at 1 for any K; fixed holds K and costs the learner's idle time only."""
    gen, train = (lambda b: 3.0), (lambda b: 1.0)
    free = simulate(10, 4, gen, train, 0.1)
    fixed = simulate(10, 4, gen, train, 0.1, fixed=True)
    assert set(free.staleness[1:]) == {1}
    assert fixed.staleness == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4]
    # Both are bound by generation: 10 generations and the last step, plus the syncs.
    assert fixed.makespan == pytest.approx(free.makespan, rel=0.05)


def test_a_violated_invariant_raises_staleness_error():
    sched = AsyncSchedule(4, 1)
    # Corrupt the state: batch 2 recorded as generated with version 0 at learner version 2.
    sched.learner_version = sched.rollout_version = sched.next_batch = 2
    sched.ready[2] = 0
    with pytest.raises(StalenessError, match="staleness 2 > asynchronous.max_staleness=1"):
        sched.next_tasks()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_staleness"):
        AsyncSchedule(3, -1)
    with pytest.raises(ValueError, match="start"):
        AsyncSchedule(3, 1, start=4)
    assert Task(SYNC, version=1).uses_learner and Task(SYNC, version=1).uses_rollout


@pytest.mark.parametrize("placement,ok", [("split", True), ("colocate_pairs", False),
                                          ("colocate_all", False)])
def test_async_job_needs_the_rollout_on_gpus_of_its_own(placement, ok):
    """If this fails, an async job could overlap generation with training on shared GPUs, or
    validation suggests a placement the async trainer cannot run."""
    from megarlhf.config import load_config
    from megarlhf.config.base import ConfigError
    from megarlhf.demo import config_path
    from megarlhf.planning import validate

    job = load_config(config_path("grpo"), [
        f"cluster.placement={placement}", "cluster.gpus_per_node=4", "actor.parallel.tp=1",
        "actor.num_gpus=1", "asynchronous.enabled=true",
        "algorithm.use_behaviour_logprobs=true",
        "actor.model.arch={model_type: llama, vocab_size: 64, hidden_size: 64, "
        "intermediate_size: 256, num_hidden_layers: 2, num_attention_heads: 2, "
        "num_key_value_heads: 2, max_position_embeddings: 128}"])  # head_dim 32: vLLM's CPU
    if ok:
        validate(job)
    else:
        with pytest.raises(ConfigError, match="set cluster.placement=split") as e:
            validate(job)
        assert "(or colocate_pairs)" not in str(e.value)
