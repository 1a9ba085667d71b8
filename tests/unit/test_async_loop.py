"""The asynchronous driver (megarlhf.controller.async_rl.AsyncLoop) on a stand-in trainer.

The trainer's phases (generate, learn, sync) are replaced by a fake that sleeps and keeps its
own account of the weights: which version the learner holds, which one a sync pushed into the
rollout, and which one each batch was sampled with. The loop's logged ``rollout/staleness``
must equal the fake's own count (the same quantity computed two ways), and
``asynchronous.fixed_staleness`` must hold it at exactly K when generation is the slower side.
"""

import threading
import time
from types import SimpleNamespace

import pytest

from megarlhf.controller.async_rl import AsyncLoop

pytestmark = pytest.mark.unit


class FakeTrainer:
    def __init__(self, steps, K, fixed, gen_s, train_s, sync_s=0.002):
        self.job = SimpleNamespace(
            train=SimpleNamespace(steps=steps, eval_every=0),
            asynchronous=SimpleNamespace(enabled=True, max_staleness=K, fixed_staleness=fixed))
        self.gen_s, self.train_s, self.sync_s = gen_s, train_s, sync_s
        self.weights = 0          # the learner's version: steps trained
        self.rollout_weights = 0  # what the last sync pushed
        self.sampled_with = {}    # batch -> version its generation used
        self.seen = []            # (batch, learner version at training, version sampled with)
        self.next_batch = 0
        self.lock = threading.Lock()
        self.sampler = SimpleNamespace(state_dict=lambda: {"batch": self.next_batch})
        self.position = self.async_state = None

    def next_prompts(self):
        b, self.next_batch = self.next_batch, self.next_batch + 1
        return [b]

    def generate(self, cl, prompts, batch):
        with self.lock:
            self.sampled_with[batch] = self.rollout_weights
        time.sleep(self.gen_s)
        return SimpleNamespace(batch=batch)

    def learn(self, cl, rollout, check_logprobs):
        b = rollout.batch
        with self.lock:
            self.seen.append((b, self.weights, self.sampled_with[b]))
        time.sleep(self.train_s)
        with self.lock:
            self.weights += 1
        return {"policy/loss": 0.0}

    def sync(self, cl, version):
        time.sleep(self.sync_s)
        with self.lock:
            # The version the loop labels the sync with is the learner's own count.
            assert version == self.weights, (version, self.weights)
            self.rollout_weights = self.weights
        return {"time/weight_sync": self.sync_s, "perf/weight_sync_gb_per_s": 1.0}

    def step_metrics(self, batch, dt):
        return {}

    def evaluate(self, cl, step):
        raise AssertionError("no evaluation in these runs")


def _run(steps, K, fixed, gen_s, train_s):
    t = FakeTrainer(steps, K, fixed, gen_s, train_s)
    rows = list(AsyncLoop(t, cl=None, start=0).steps())
    assert [s for s, _ in rows] == list(range(1, steps + 1))
    logged = [m["rollout/staleness"] for _, m in rows]
    own = [float(learner - sampled) for _, learner, sampled in sorted(t.seen)]
    assert logged == own, (logged, own)
    return logged


@pytest.mark.parametrize("K", [2, 3])
def test_fixed_staleness_is_exactly_K_when_generation_is_slower(K):
    """If this fails, asynchronous.fixed_staleness does not reach the driver, or the driver
    does not carry out the schedule it asks for (the staleness study's x axis would be wrong)."""
    logged = _run(8, K, True, gen_s=0.03, train_s=0.005)
    assert logged == [float(min(K, b)) for b in range(8)]


def test_max_staleness_is_a_bound_the_faster_schedule_stays_under():
    """With generation the slower side the default syncs whenever both sides are free: batches
    are one version old whatever K is (why the study needs fixed_staleness)."""
    logged = _run(8, 3, False, gen_s=0.03, train_s=0.005)
    assert logged[0] == 0.0 and set(logged[1:]) == {1.0}
