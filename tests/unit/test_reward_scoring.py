"""Reward-model inputs and scores, and the reward computer (megarlhf.rewards): one builder and
one scorer for RL, RM training and best-of-N, checked against each other and by hand.

The reward model is a fake worker group whose value at token t is a fixed function of the whole
prefix ``ids[:t+1]`` - so a score depends on every input id and on where it is read - and the
policy and the reward model use *different* sentencepiece tokenizers."""

import torch
import pytest

from megarlhf.config import JobConfig, from_dict
from megarlhf.controller.bon import rm_scores as bon_rm_scores
from megarlhf.controller.experience import build_rollout
from megarlhf.data.datasets import Source
from megarlhf.data.demo_task import ArithmeticTask
from megarlhf.data.job_data import PromptItem
from megarlhf.data.rm_datasets import response_sequence, rm_input
from megarlhf.data.tokenizer import ChatTemplate, train_sentencepiece
from megarlhf.models.tiny import tiny_arch
from megarlhf.rewards.computer import RewardComputer
from megarlhf.rewards.reward_model import RewardModelScorer, sequence_scores
from megarlhf.rollout.base import RolloutOutput, Sample

pytestmark = pytest.mark.unit


def _train_tok(path, vocab):
    task = ArithmeticTask()
    texts = [p.prompt + p.solution for p in task.problems("train", 300, seed=0)]
    return train_sentencepiece(texts, path, vocab, required_chars="0123456789+-*=answr: ",
                               chat_template=ChatTemplate.plain())


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    return _train_tok(d / "policy", 64), _train_tok(d / "rm", 80)


class PrefixRM:
    """A reward-model worker group: ``values[b, t] = h(ids[b, :t+1])`` (real tokens only)."""

    dp_size = 2

    def __init__(self):
        self.seen: list[list[int]] = []

    def forward(self, batch):
        assert batch.batch_size % self.dp_size == 0  # the scorer pads to a DP multiple
        ids = batch.input_ids.double()
        w = torch.arange(1, ids.shape[1] + 1, dtype=torch.float64)
        values = (torch.cumsum(ids * w, dim=1) % 97 - 48) / 10  # (B, S)
        self.seen += [row[m].tolist() for row, m in zip(batch.input_ids, batch.attention_mask)]
        return {"values": values.float()}


def _job(tmp_path, rm_tok, rm_type="orm", sources=None):
    return from_dict(JobConfig, {
        "kind": "grpo", "output_dir": str(tmp_path),
        "actor": {"model": {"arch": tiny_arch("llama")}},
        "reward_model": {"model": {"arch": tiny_arch("llama"), "tokenizer": str(rm_tok.model_file)}},
        "reward": {"sources": sources or {"rm": 1.0}, "rm_type": rm_type,
                   "prm_step_delimiter": "\n", "prm_aggregation": "min"},
        "data": {"apply_chat_template": True, "max_prompt_len": 32},
        "train": {"max_seq_len": 256},
    })


PROMPT = "12+7*3="
RESPONSES = ["7*3=21\n12+21=33\nanswer: 33", "7*3=24\n12+24=36\nanswer: 36", "7*3=21\n12+"]


def _rollout(policy_tok, prompt_item, texts, truncated):
    samples = []
    for t, cut in zip(texts, truncated):
        ids = policy_tok.encode(t) + ([] if cut else [policy_tok.eos_id])
        samples.append(Sample(token_ids=ids, logprobs=None,
                              finish_reason="length" if cut else "stop"))
    return build_rollout([prompt_item], [RolloutOutput(tuple(prompt_item.ids), tuple(samples))],
                         policy_tok, pad_id=policy_tok.pad_id)


@pytest.mark.parametrize("rm_type", ["orm", "prm"])
def test_rl_and_best_of_n_give_one_text_the_same_score(tmp_path, toks, rm_type):
    """If this fails, RL and best-of-N score the same response differently (different inputs,
    tokenizer or read positions), a truncated sample is scored without the EOS, or RL feeds the
    policy's token ids to a reward model whose tokenizer differs."""
    policy_tok, rm_tok = toks
    job = _job(tmp_path, rm_tok, rm_type)
    item = PromptItem(ids=policy_tok.apply_chat_template([{"role": "user", "content": PROMPT}]),
                      text=PROMPT, answer="33", prompt=PROMPT)
    rollout = _rollout(policy_tok, item, RESPONSES, truncated=[False, False, True])
    assert rollout.batch.fields["truncated"].tolist() == [False, False, True]
    assert rollout.responses == RESPONSES  # decoded: the EOS is not part of the text

    rl_group, bon_group = PrefixRM(), PrefixRM()
    computer = RewardComputer(job, RewardModelScorer(job, rl_group, rm_tok))
    rl, metrics = computer(rollout.sample_prompts, rollout.responses)
    bon = bon_rm_scores(job, bon_group, rm_tok, [PROMPT], [RESPONSES])
    assert bon.shape == (1, 3)
    torch.testing.assert_close(rl, bon[0], rtol=0, atol=0)
    assert metrics["reward/rm_mean"] == pytest.approx(float(rl.mean()))

    # What the reward model saw: RM training's sequences, in its own tokenizer, EOS included.
    pids = rm_tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    want = [response_sequence(job, rm_tok, pids, t, Source(), "response",
                              steps=rm_type == "prm") for t in RESPONSES]
    assert rl_group.seen[:3] == bon_group.seen[:3] == [s.ids for s in want]
    assert all(s.ids[-1] == rm_tok.eos_id for s in want)
    policy_ids = [list(item.ids) + policy_tok.encode(t) for t in RESPONSES]
    assert all(s.ids != p for s, p in zip(want, policy_ids))  # not the policy's ids

    # And the score is the one read at the training read positions.
    values = [rl_group.forward(_one(s.ids))["values"][0] for s in want]
    torch.testing.assert_close(rl, sequence_scores(values, want, prm=rm_type == "prm",
                                                   aggregation="min"))


def _one(ids):
    from megarlhf.engine.batch import TokenBatch

    return TokenBatch.from_sequences([ids, ids])


def test_rm_input_read_positions(toks):
    """If this fails, an ORM is not read at the EOS, or a PRM's steps are read off their last
    token (the final step not at the EOS)."""
    _, tok = toks
    pids = [1, 5, 6]
    orm = rm_input(tok, pids, "7*3=21\n12+21=33", prm=False)
    assert orm.ids == pids + tok.encode("7*3=21\n12+21=33") + [tok.eos_id]
    assert orm.step_pos == () and orm.read_pos == (len(orm.ids) - 1,)
    prm = rm_input(tok, pids, "7*3=21\n12+21=33", prm=True, delimiter="\n")
    assert prm.ids == orm.ids
    nl = tok.encode("\n")[-1]
    assert prm.step_pos[-1] == len(prm.ids) - 1
    assert [prm.ids[p] for p in prm.step_pos[:-1]] == [nl]  # the first step ends at its "\n"
    # A truncated response gets the EOS too: the same place to read whatever ended it.
    cut = rm_input(tok, pids, "7*3=", prm=False)
    assert cut.ids[-1] == tok.eos_id


def test_reward_computer_mixes_sources(tmp_path, toks):
    """If this fails, reward.sources weights are not applied, a source's mean is mislogged, or
    the verifier does not see each sample's own prompt and answer."""
    _, rm_tok = toks
    job = _job(tmp_path, rm_tok, sources={"math": 2.0, "rm": 0.5})
    group = PrefixRM()
    computer = RewardComputer(job, RewardModelScorer(job, group, rm_tok))
    prompts = [PromptItem(ids=[1], text="2+2=", answer="4", prompt="2+2="),
               PromptItem(ids=[1], text="3+3=", answer="6", prompt="3+3=")]
    texts = ["answer: 4", "answer: 5"]
    raw, m = computer(prompts, texts)
    rm = RewardModelScorer(job, PrefixRM(), rm_tok)([p.prompt for p in prompts], texts)
    torch.testing.assert_close(raw, 2.0 * torch.tensor([1.0, 0.0]) + 0.5 * rm)
    assert m["reward/math_mean"] == 0.5 and m["reward/accuracy"] == 0.5
    assert m["reward/rm_mean"] == pytest.approx(float(rm.mean()))
    with pytest.raises(ValueError, match="prompts for"):
        computer(prompts[:1], texts)
    with pytest.raises(ValueError, match="no reward model scorer"):
        RewardComputer(job, None)
