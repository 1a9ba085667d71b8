"""Multi-turn agents (megarlhf.agents): the calculator's evaluator, token-exact trajectories on
real chat templates, and environment faults that end one trajectory, never the rollout.

The engine here is scripted (it returns given token ids, as vLLM returns what it sampled): what
is tested is the assembly around it. Oracles: the chat template's own rendering of the whole
conversation, and the ids the engine returned.
"""

import json
import time

import pytest

from megarlhf.agents import AgentSettings, Environment, StepResult, run_agent_rollouts
from megarlhf.agents.builtins import CalculatorEnv, GuessEnv
from megarlhf.agents.calc import CalcError, evaluate
from megarlhf.agents.rollout import trajectory_outputs
from megarlhf.agents.trajectory import TemplateError, TokenAssembler, assembler_for, check_template
from megarlhf.rollout.base import RolloutOutput, Sample, SamplingParams

pytestmark = pytest.mark.unit

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer with ChatML special tokens and a ChatML template (the format
    of Qwen's templates), made here: no hub download."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from megarlhf.data.tokenizer import HFTokenizer

    corpus = ["what is 12*(7+3)? <tool>calc: 12*(7+3)</tool> <result>120</result> answer: 120",
              "guess the number higher lower 1 2 3 4 5 6 7 8 9 0 tool user assistant system"] * 50
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    d = tmp_path_factory.mktemp("chatml")
    tok.save_pretrained(str(d))
    return HFTokenizer(str(d))


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """megarlhf's own sentencepiece tokenizer with its role-tag template (the demo's format)."""
    from megarlhf.data.tokenizer import ChatTemplate, train_sentencepiece

    corpus = ["what is 12*(7+3)? <tool>calc: 12*(7+3)</tool> <result>120</result> answer: 120",
              "guess the number: higher lower 1 2 3 4 5 6 7 8 9 0"] * 40
    return train_sentencepiece(corpus, str(tmp_path_factory.mktemp("sp") / "tok"),
                               vocab_size=120, chat_template=ChatTemplate())


class ScriptedEngine:
    """Returns the next scripted reply (text, in call order over all contexts) as token ids +
    a stop token, with a made-up log-prob per token; records what it was asked."""

    def __init__(self, tokenizer, replies, stop_id, finish="stop"):
        self.tok, self.replies, self.stop_id, self.finish = tokenizer, replies, stop_id, finish
        self.calls, self.returned = [], []

    def __call__(self, contexts, params):
        self.calls.append([list(c) for c in contexts])
        outs = []
        for ctx in contexts:
            text = self.replies.pop(0)
            ids = self.tok.encode(text) + ([self.stop_id] if self.finish == "stop" else [])
            finish = self.finish
            if len(ids) > params.max_new_tokens:  # as an engine does: cut, no stop token
                ids, finish = ids[:params.max_new_tokens], "length"
            self.returned.append(list(ids))
            outs.append(RolloutOutput(ctx, (Sample(ids, [-0.5] * len(ids), finish),)))
        return outs


def _start(tokenizer, prompt="what is 12*(7+3)?", answer=120):
    messages = [{"role": "user", "content": prompt}]
    return (tokenizer.apply_chat_template(messages, True), messages, {"answer": answer})


# ---------------------------------------------------------------------------- the evaluator
def test_calculator_evaluates_arithmetic_only():
    """If this fails, the calculator tool evaluates something other than bounded arithmetic
    (a name, a call, a huge power) or gets plain arithmetic wrong."""
    assert evaluate("12*(7+3) - 4/2") == 118 and evaluate("7/2") == 3.5
    assert evaluate("-(2**10) % 7") == (-(2 ** 10)) % 7 and evaluate("10 // 3") == 3
    for bad in ("__import__('os')", "x + 1", "2**100000", "1/0", "[1]*9", "9**64", "1e19+1",
                "", "(" * 300):
        with pytest.raises(CalcError):
            evaluate(bad)


# ---------------------------------------------------------------- token-exact trajectories
@pytest.mark.parametrize("which", ["chatml", "sentencepiece"])
def test_trained_ids_are_the_generated_ids_and_every_separator_is_there(which, chatml_tokenizer,
                                                                        sp_tokenizer):
    """If this fails, a multi-turn trajectory trains tokens the engine never generated
    (earlier turns re-tokenized), drops the template's separator between turns (verl PR 6921),
    repeats the stop token, or puts generated tokens under the observation mask."""
    tok = chatml_tokenizer if which == "chatml" else sp_tokenizer
    stop = tok.eos_id
    asm = assembler_for(tok, [stop])
    check_template(asm)
    replies = ["let me use the tool <tool>calc: 12*(7+3)</tool>", "answer: 120"]
    engine = ScriptedEngine(tok, list(replies), stop)
    trajs, m = run_agent_rollouts(engine, [_start(tok)], CalculatorEnv, asm,
                                  SamplingParams(max_new_tokens=64), AgentSettings())
    [t] = trajs
    assert t.finish == "done" and t.reward == 1.0 and t.turns == 2
    assert m["agent/tool_calls_mean"] == 1 and m["agent/done_frac"] == 1
    # 1. the generated tokens, in order, are exactly what the engine returned
    gen = [i for i, g in zip(t.ids, t.generated) if g]
    assert gen == engine.returned[0] + engine.returned[1]
    first = len(engine.returned[0])
    assert t.ids[:first] == engine.returned[0] and t.ids[-len(engine.returned[1]):] \
        == engine.returned[1]
    # 2. the engine's second call continued exactly the trained prefix
    assert engine.calls[1][0] == t.prompt_ids + t.ids[:len(t.ids) - len(engine.returned[1])]
    # 3. log-probs only at generated tokens
    assert all((lp == -0.5) == bool(g) for lp, g in zip(t.logprobs, t.generated))
    # 4. the whole sequence is the template's own rendering of the conversation
    conv = [{"role": "user", "content": "what is 12*(7+3)?"},
            {"role": "assistant", "content": replies[0]},
            {"role": "tool", "content": "<result>120</result>"},
            {"role": "assistant", "content": replies[1]}]
    full = tok.render_chat(conv, add_generation_prompt=False)
    text = tok.decode(t.prompt_ids + t.ids, skip_special_tokens=False)
    bos = tok.decode([tok.bos_id], skip_special_tokens=False) if tok.bos_id is not None else ""
    text = text[len(bos):] if bos and text.startswith(bos) and not full.startswith(bos) else text
    if which == "chatml":
        # <|im_end|> is generated (the template's own end of turn); its "\n" follows it
        assert full == text + "\n"
        assert text.count("<|im_end|>\n<|im_start|>") == 3  # user|assistant|tool|assistant
    else:
        # the template writes no EOS: the generated </s> ends each turn, then its "\n"
        eos = tok.decode([stop], skip_special_tokens=False)
        assert text.count(eos) == 2 and full == text.replace(eos, "") + "\n"
        assert text.count(eos + "\n<|user|>") == 1 and text.count("\n<|assistant|>") == 2
    # 5. the observation tokens are unmasked nowhere and hold the tool's answer
    obs = tok.decode([i for i, g in zip(t.ids, t.generated) if not g],
                     skip_special_tokens=False)
    assert "<result>120</result>" in obs and t.observation_tokens == sum(
        1 for g in t.generated if not g)


def test_trajectories_become_samples_with_their_mask_and_reward(sp_tokenizer):
    """If this fails, a trajectory's observation tokens are trained (mask), its reward is
    lost, or its group is split."""
    from megarlhf.controller.experience import build_rollout
    from megarlhf.data.job_data import PromptItem

    tok = sp_tokenizer
    asm = assembler_for(tok, [tok.eos_id])
    replies = ["<tool>calc: 2*3</tool>", "answer: 6"]
    starts = [_start(tok, "2*3?", 6)] * 2
    engine = ScriptedEngine(tok, replies + replies, tok.eos_id)
    trajs, _ = run_agent_rollouts(engine, starts, CalculatorEnv, asm,
                                  SamplingParams(max_new_tokens=32), AgentSettings())
    outs = trajectory_outputs(trajs, n=2)
    item = PromptItem(ids=starts[0][0], prompt=starts[0][1], answer=6)
    r = build_rollout([item], outs, tok, pad_id=tok.pad_id)
    mask = r.batch.fields["response_mask"]
    for row, t in enumerate(trajs):
        P = len(t.prompt_ids)
        got = mask[row, P:P + len(t.ids)].tolist()
        assert got == [float(g) for g in t.generated]
        assert mask[row, :P].sum() == 0
    assert [s.reward for s in outs[0].samples] == [1.0, 1.0]
    assert r.batch.fields["prompt_index"].tolist() == [0, 0]


def test_a_template_that_rewrites_history_is_refused_up_front(sp_tokenizer):
    """If this fails, a template that changes earlier assistant messages (e.g. drops their
    reasoning) silently produces trajectories whose tokens differ from what was generated."""
    def render(messages, gen):
        out = "".join(f"[{m['role']}]{m['content'].split('</think>')[-1]}" for m in messages)
        return out + ("[assistant]" if gen else "")

    asm = TokenAssembler(render, sp_tokenizer.encode, sp_tokenizer.decode,
                         lambda i: "", [sp_tokenizer.eos_id])
    from megarlhf.agents.trajectory import Trajectory

    t = Trajectory([], [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "<think>x</think>y"}])
    with pytest.raises(TemplateError, match="only appends"):
        asm.observation_ids(t, [{"role": "user", "content": "z"}])


# ------------------------------------------------------------------------- environment faults
class Raises(Environment):
    def step(self, text):
        raise RuntimeError("tool server down")


class Hangs(Environment):
    def step(self, text):
        time.sleep(30)


class Garbage(Environment):
    def step(self, text):
        return {"reward": 1}


class BadReset(Environment):
    def reset(self, row):
        raise KeyError("answer")


class Echo(Environment):
    """Answers every message (never done): the trajectory ends at its limits."""

    def step(self, text):
        return StepResult([{"role": "user", "content": "go on"}], reward=0.25)


class AsyncGuess(GuessEnv):
    async def step(self, text):
        return GuessEnv.step(self, text)


@pytest.mark.parametrize("env,finish,counter", [
    (Raises, "env_error", "agent/env_errors"),
    (Hangs, "env_timeout", "agent/env_timeouts"),
    (Garbage, "env_garbage", "agent/env_garbage"),
    (BadReset, "env_error", "agent/env_errors"),
])
def test_an_environment_fault_ends_its_trajectory_only(env, finish, counter, sp_tokenizer):
    """If this fails, an environment that raises, hangs or returns garbage ends the whole
    rollout (or hangs it), instead of ending its own trajectory with the fault reward."""
    tok = sp_tokenizer
    asm = assembler_for(tok, [tok.eos_id])
    good = _start(tok, "2*3?", 6)
    envs = iter([env, CalculatorEnv])

    def make():
        return next(envs)()

    engine = ScriptedEngine(tok, ["answer: 6", "answer: 6"], tok.eos_id)
    t0 = time.monotonic()
    trajs, m = run_agent_rollouts(engine, [good, good], make, asm,
                                  SamplingParams(max_new_tokens=32),
                                  AgentSettings(step_timeout_s=0.5, fault_reward=-1.0))
    assert time.monotonic() - t0 < 10
    assert trajs[0].finish == finish and trajs[0].reward == -1.0 and m[counter] == 1
    assert trajs[1].finish == "done" and trajs[1].reward == 1.0


def test_malformed_tool_calls_are_observations_and_limits_end_trajectories(sp_tokenizer):
    """If this fails, a malformed tool call raises (or is silently ignored), or a trajectory
    runs past max_turns / max_tokens."""
    tok = sp_tokenizer
    asm = assembler_for(tok, [tok.eos_id])
    engine = ScriptedEngine(tok, ["<tool>calc: 12*</tool>", "answer: 6"], tok.eos_id)
    [t], m = run_agent_rollouts(engine, [_start(tok, "2*3?", 6)], CalculatorEnv, asm,
                                SamplingParams(), AgentSettings())
    assert t.finish == "done" and m["agent/tool_errors_mean"] == 1
    obs = tok.decode([i for i, g in zip(t.ids, t.generated) if not g])
    assert "<error>" in obs
    # max_turns: an environment that never ends
    engine = ScriptedEngine(tok, ["more"] * 10, tok.eos_id)
    [t], m = run_agent_rollouts(engine, [_start(tok)], Echo, asm, SamplingParams(),
                                AgentSettings(max_turns=3))
    assert t.finish == "max_turns" and t.turns == 3 and t.reward == 0.75
    assert m["agent/truncated_frac"] == 1
    # max_tokens: the trajectory is cut at the budget
    engine = ScriptedEngine(tok, ["more more more more more more"] * 10, tok.eos_id)
    [t], _ = run_agent_rollouts(engine, [_start(tok)], Echo, asm, SamplingParams(),
                                AgentSettings(max_turns=50, max_tokens=20))
    assert t.finish == "max_tokens" and len(t.ids) <= 20
    assert all(len(c) - len(t.prompt_ids) < 20 for c in engine.calls[-1])  # budgets held
    # a turn that reached its token limit without a stop token
    engine = ScriptedEngine(tok, ["more"], tok.eos_id, finish="length")
    [t], _ = run_agent_rollouts(engine, [_start(tok)], Echo, asm, SamplingParams(),
                                AgentSettings())
    assert t.finish == "turn_length" and t.turns == 1


def test_multi_turn_game_without_tools_and_async_steps(sp_tokenizer):
    """If this fails, a multi-turn environment without tools (the guessing game), or one whose
    step is a coroutine, does not run to its end with the right reward."""
    tok = sp_tokenizer
    asm = assembler_for(tok, [tok.eos_id])
    engine = ScriptedEngine(tok, ["5", "8", "7"], tok.eos_id)
    [t], m = run_agent_rollouts(engine, [_start(tok, "guess", 7)], AsyncGuess, asm,
                                SamplingParams(), AgentSettings())
    assert t.finish == "done" and t.turns == 3 and t.reward == pytest.approx(0.8)
    hints = tok.decode([i for i, g in zip(t.ids, t.generated) if not g])
    assert "higher" in hints and "lower" in hints
    assert m["agent/info/turns"] == 3


@pytest.mark.parametrize("which", ["chatml", "sentencepiece"])
def test_multi_turn_sft_rows_are_laid_out_as_trajectories(which, chatml_tokenizer, sp_tokenizer,
                                                          tmp_path):
    """If this fails, a multi-turn SFT conversation is tokenized differently from the agent
    trajectory the policy later generates (SFT teaches one layout, RL samples another), or its
    loss covers the tool's messages."""
    from megarlhf.config.base import from_dict
    from megarlhf.config.schema import JobConfig
    from megarlhf.data.job_data import load_sft_samples

    tok = chatml_tokenizer if which == "chatml" else sp_tokenizer
    replies = ["let me use the tool <tool>calc: 12*(7+3)</tool>", "answer: 120"]
    conv = [{"role": "user", "content": "what is 12*(7+3)?"},
            {"role": "assistant", "content": replies[0]},
            {"role": "tool", "content": "<result>120</result>"},
            {"role": "assistant", "content": replies[1]}]
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps(
        {"prompt": "2*3?", "response": "answer: 6"}) + "\n")
    job = from_dict(JobConfig, {"kind": "sft", "actor": {"model": {"arch": {}}},
                                "data": {"train_path": str(path)},
                                "train": {"max_seq_len": 256}})
    multi, single = load_sft_samples(job, tok)
    # the same conversation as an agent trajectory (the engine returns the replies' tokens)
    engine = ScriptedEngine(tok, list(replies), tok.eos_id)
    [t], _ = run_agent_rollouts(engine, [_start(tok)], CalculatorEnv, assembler_for(
        tok, [tok.eos_id]), SamplingParams(max_new_tokens=64), AgentSettings())
    assert multi.ids == t.prompt_ids + t.ids
    assert multi.loss_mask == [0] * len(t.prompt_ids) + t.generated
    assert sum(single.loss_mask) == len(tok.encode("answer: 6")) + 1


def test_agent_demo_flags_are_checked_before_it_starts(tmp_path, capsys, monkeypatch):
    """If this fails, `megarlhf demo --agent` with a reward it does not use or a bad step count
    starts (and spends minutes) instead of one message."""
    import megarlhf.demo.agent as agent_demo
    from megarlhf.cli import main

    monkeypatch.setattr(agent_demo, "prepare_agent_data",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("started")))
    out = str(tmp_path / "d")
    assert main(["demo", "--agent", "--reward", "rm", "--output-dir", out]) == 2
    assert "the agent demo is rewarded by its environment" in capsys.readouterr().err
    assert main(["demo", "--agent", "--rl-steps", "0", "--output-dir", out]) == 2
    assert "--rl-steps 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_agent_rollout_runs_on_the_transformers_engine(tmp_path):
    """If this fails, agent rollouts work only with a scripted engine: the transformers engine
    (the debugging engine) cannot drive multi-turn trajectories, or its log-probs do not land on
    the generated tokens."""
    from _inputs import make_inputs
    from megarlhf.data.tokenizer import load_tokenizer
    from megarlhf.rollout.hf_engine import HFRolloutEngine

    inputs = make_inputs(str(tmp_path))
    tok = load_tokenizer(inputs["lm"])
    engine = HFRolloutEngine(inputs["lm"])
    asm = assembler_for(tok, [tok.eos_id])
    starts = [(tok.apply_chat_template([{"role": "user", "content": "guess"}], True),
               [{"role": "user", "content": "guess"}], {"answer": 7})] * 3
    params = SamplingParams(temperature=1.0, stop_token_ids=(tok.eos_id,), seed=3)
    trajs, m = run_agent_rollouts(engine.generate, starts, GuessEnv, asm, params,
                                  AgentSettings(max_turns=3, max_tokens=40,
                                                max_tokens_per_turn=8))
    assert len(trajs) == 3 and all(t.finish for t in trajs)
    assert m["agent/turns_mean"] >= 1
    for t in trajs:
        assert len(t.ids) == len(t.generated) == len(t.logprobs) <= 40
        assert all((lp != 0.0) for lp, g in zip(t.logprobs, t.generated) if g)
        assert all(lp == 0.0 for lp, g in zip(t.logprobs, t.generated) if not g)


def test_function_tools_parsed_by_vllms_hermes_parser(chatml_tokenizer):
    """If this fails, tool calls in a model family's own format (Hermes/Qwen
    <tool_call>{json}</tool_call>) are not parsed by vLLM's parser, a tool's result does not come
    back as a tool message, or a malformed call / unknown tool / failing tool raises instead of
    being an observation."""
    from megarlhf.agents.env import EnvError, make_env_factory

    make = make_env_factory("tools", {"tools": {"calc": "megarlhf.agents.calc:evaluate"},
                                      "tokenizer": str(chatml_tokenizer.path)})
    env = make()
    env.reset({"answer": 120})
    call = ('<tool_call>\n{"name": "calc", "arguments": {"text": "12*(7+3)"}}\n</tool_call>')
    r = env.step(call)
    assert not r.done and r.observations == [{"role": "tool", "content": "120"}]
    r = env.step('<tool_call>\n{"name": "calc", "arguments": {"text": "1/0"}}\n</tool_call>')
    assert "division by zero" in r.observations[0]["content"] and r.info["tool_errors"] == 1
    r = env.step('<tool_call>\n{"name": "wolfram", "arguments": {}}\n</tool_call>')
    assert "unknown tool 'wolfram'" in r.observations[0]["content"]
    r = env.step('<tool_call>\n{"name": "calc", "arguments": {"text": </tool_call>')
    assert "could not read the tool call" in r.observations[0]["content"]
    r = env.step("answer: 120")
    assert r.done and r.reward == 1.0 and r.info["tool_errors"] == 3
    # bad options are config errors, found once up front
    with pytest.raises(EnvError, match="vLLM has no tool parser"):
        make_env_factory("tools", {"tools": {"calc": "megarlhf.agents.calc:evaluate"},
                                   "tokenizer": str(chatml_tokenizer.path),
                                   "tool_parser": "nope"})
    with pytest.raises(EnvError, match="not an importable module:function"):
        make_env_factory("tools", {"tools": {"calc": "megarlhf.agents.calc:nothing"},
                                   "tokenizer": str(chatml_tokenizer.path)})


def test_tool_schemas_are_rendered_into_every_prompt(tmp_path, chatml_tokenizer):
    """If this fails, the model is never told which tools exist (the schemas the chat template
    renders from `tools`), the trajectory's renderings disagree about them (not token-exact),
    or a prompt that the schemas push past data.max_prompt_len starts."""
    import shutil

    from megarlhf.config.base import ConfigError, from_dict
    from megarlhf.config.schema import JobConfig
    from megarlhf.controller.agent import AgentRollouts
    from megarlhf.data.job_data import PromptItem
    from megarlhf.data.tokenizer import HFTokenizer

    d = tmp_path / "tok"
    shutil.copytree(chatml_tokenizer.path, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    with_tools = ("{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n"
                  "{% endfor %}<|im_end|>\n{% endif %}" + CHATML)
    (d / "chat_template.jinja").write_text(with_tools)  # where transformers 5 reads it
    cfg["chat_template"] = with_tools
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = HFTokenizer(str(d))
    agent = {"env": "tools", "max_tokens": 256, "options": {
        "tools": {"calc": "megarlhf.agents.calc:evaluate"}, "tokenizer": str(d)}}
    job = from_dict(JobConfig, {"kind": "grpo", "actor": {"model": {"arch": {}}},
                                "rollout": {"max_new_tokens": 64, "agent": agent},
                                "reward": {"sources": {"env": 1.0}},
                                "data": {"max_prompt_len": 512}})
    ag = AgentRollouts(job, tok)
    item = PromptItem(ids=tok.apply_chat_template([{"role": "user", "content": "12*(7+3)?"}]),
                      prompt="12*(7+3)?", answer=120)
    ids = ag.prompt_ids(item)
    assert '"name": "calc"' in tok.decode(ids, skip_special_tokens=False)
    call = '<tool_call>\n{"name": "calc", "arguments": {"text": "12*(7+3)"}}\n</tool_call>'

    class Engine:
        replies = [call, "answer: 120"]

        def generate(self, contexts, params):
            out = []
            for c in contexts:
                g = tok.encode(self.replies.pop(0)) + [tok.eos_id]
                out.append(RolloutOutput(c, (Sample(g, [-0.1] * len(g), "stop"),)))
            return out

    outs, m, [t] = ag.run(Engine(), [item], SamplingParams(max_new_tokens=64))
    assert t.finish == "done" and t.reward == 1.0 and m["agent/tool_calls_mean"] == 1
    assert outs[0].samples[0].prompt_ids == tuple(ids)
    full = tok.render_chat(t.messages, add_generation_prompt=False, tools=ag.tools)
    assert full == tok.decode(t.prompt_ids + t.ids, skip_special_tokens=False) + "\n"
    short = from_dict(JobConfig, {"kind": "grpo", "actor": {"model": {"arch": {}}},
                                  "rollout": {"max_new_tokens": 64, "agent": agent},
                                  "reward": {"sources": {"env": 1.0}},
                                  "data": {"max_prompt_len": 16}})
    with pytest.raises(ConfigError, match="with the environment's tool schemas is"):
        AgentRollouts(short, tok).check_prompts([item])


class Opening(GuessEnv):
    """Adds a system message before the first turn."""

    def reset(self, row):
        GuessEnv.reset(self, row)
        return [{"role": "system", "content": "guess a number " * int(row.get("repeat", 1))}]


def test_opening_messages_extend_the_prompt_within_its_limit(sp_tokenizer):
    """If this fails, an environment's opening messages are dropped, the sample does not carry
    its own prompt, or an opening that makes the prompt too long reaches the engine."""
    tok = sp_tokenizer
    asm = assembler_for(tok, [tok.eos_id])
    base = _start(tok, "guess", 7)
    long = (base[0], base[1], {"answer": 7, "repeat": 50})
    engine = ScriptedEngine(tok, ["7"], tok.eos_id)
    trajs, m = run_agent_rollouts(engine, [base, long], Opening, asm, SamplingParams(),
                                  AgentSettings(max_prompt_tokens=64))
    assert trajs[0].finish == "done" and trajs[0].extended_prompt
    assert "guess a number" in tok.decode(trajs[0].prompt_ids)
    assert len(engine.calls) == 1 and engine.calls[0][0] == trajs[0].prompt_ids
    assert trajs[1].finish == "env_error" and "over data.max_prompt_len = 64" in \
        trajs[1].info["fault"] and m["agent/env_errors"] == 1
    [out] = trajectory_outputs(trajs, n=2)
    assert out.samples[0].prompt_ids == tuple(trajs[0].prompt_ids)


@pytest.mark.parametrize("which", ["chatml", "sentencepiece"])
def test_openai_api_agent_programs_are_trained_token_exactly(which, chatml_tokenizer,
                                                             sp_tokenizer):
    """If this fails, an agent written against the OpenAI chat API (the `openai` client) cannot
    be trained unchanged: its conversation is not recorded token-exactly through megarlhf's
    endpoint, its return value is not the reward, or a program that rewrites the conversation,
    crashes or returns garbage ends more than its own trajectory."""
    import agent_programs as P

    from megarlhf.agents.openai_server import run_program_rollouts

    tok = chatml_tokenizer if which == "chatml" else sp_tokenizer
    asm = assembler_for(tok, [tok.eos_id])
    replies = ["let me use the tool <tool>calc: 12*(7+3)</tool>", "answer: 120"]
    engine = ScriptedEngine(tok, list(replies), tok.eos_id)
    row = {"prompt": "what is 12*(7+3)?", "answer": 120}
    [t], m = run_program_rollouts(engine, [([], [], row)], P.solve, asm, SamplingParams(),
                                  AgentSettings())
    assert t.finish == "done" and t.reward == 1.0 and t.turns == 2, t.info
    assert [i for i, g in zip(t.ids, t.generated) if g] == engine.returned[0] + \
        engine.returned[1]
    conv = [{"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": replies[0]},
            {"role": "tool", "content": "<result>120</result>"},
            {"role": "assistant", "content": replies[1]}]
    assert t.messages == conv and t.prompt_ids == tok.apply_chat_template(conv[:1])
    assert engine.calls[1][0] == t.prompt_ids + t.ids[:len(t.ids) - len(engine.returned[1])]
    # faults: each ends its own trajectory; the good one next to them completes
    class ByContext(ScriptedEngine):
        """Replies by what the context holds (requests of two threads arrive in any order)."""

        def __call__(self, contexts, params):
            self.replies = []
            for c in contexts:
                text = tok.decode(c, skip_special_tokens=False)
                self.replies.append("answer: 120" if "<result>" in text else
                                    "hello" if "bad" in text else replies[0])
            return ScriptedEngine.__call__(self, contexts, params)

    for bad, counter in ((P.rewrites_history, "agent/env_errors"),
                         (P.crashes, "agent/env_errors"), (P.no_number, "agent/env_garbage")):
        engine = ByContext(tok, [], tok.eos_id)

        def program(base_url, tid, r, bad=bad):
            return bad(base_url, tid, r) if r.get("bad") else P.solve(base_url, tid, r)

        trajs, m = run_program_rollouts(
            engine, [([], [], dict(row, bad=True, prompt="bad " + row["prompt"])),
                     ([], [], row)], program, asm,
            SamplingParams(), AgentSettings(fault_reward=-1.0))
        assert trajs[0].reward == -1.0 and m[counter] == 1, (bad, trajs[0].info)
        assert trajs[1].finish == "done"
