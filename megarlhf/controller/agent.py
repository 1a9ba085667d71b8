"""Agent rollouts in an RL job (``rollout.agent``): the trainer's generation and evaluation
when each sample is a multi-turn trajectory (:mod:`megarlhf.agents`).

Each prompt gets ``batch.n_samples_per_prompt`` trajectories (its GRPO group); the environment
sees the prompt's row (``prompt``, ``answer`` and the row's other fields). The trajectories
reach the learner as samples whose loss mask covers the generated tokens only, with the
environment's reward (the ``env`` reward source).
"""

from __future__ import annotations

from typing import Any

from megarlhf.agents.env import make_env_factory
from megarlhf.agents.openai_server import program_function, run_program_rollouts
from megarlhf.agents.rollout import AgentSettings, run_agent_rollouts, trajectory_outputs
from megarlhf.agents.trajectory import Trajectory, assembler_for, check_template
from megarlhf.config.base import ConfigError
from megarlhf.config.schema import JobConfig
from megarlhf.data.datasets import prompt_messages
from megarlhf.data.job_data import PromptItem
from megarlhf.rollout.base import RolloutOutput, SamplingParams


class AgentRollouts:
    """The agent loop of one job: its environment factory, limits and token assembly.

    Raises:
        EnvError: the environment or its options do not fit (at construction, before Ray).
        TemplateError: the tokenizer's chat template is not prefix-stable.
    """

    def __init__(self, job: JobConfig, tokenizer):
        a = job.rollout.agent
        self.program = program_function(a.program) if a.program else None
        self.make_env = None if a.program else make_env_factory(a.env, dict(a.options))
        self.settings = AgentSettings(max_turns=a.max_turns, max_tokens=a.max_tokens,
                                      max_tokens_per_turn=job.rollout.max_new_tokens,
                                      step_timeout_s=a.step_timeout_s,
                                      fault_reward=a.fault_reward,
                                      max_prompt_tokens=job.data.max_prompt_len)
        self.tokenizer = tokenizer
        self.max_prompt_len = job.data.max_prompt_len
        # The environment's tool schemas (if any) are in every rendering of a trajectory.
        self.tools = getattr(self.make_env, "tool_schemas", None)
        self.assembler = assembler_for(tokenizer, [tokenizer.eos_id], self.tools)
        self._with_tools: dict[tuple[int, ...], tuple[int, ...]] = {}  # prompt_ids' cache
        check_template(self.assembler)

    def prompt_ids(self, p: PromptItem) -> list[int]:
        """The prompt as a trajectory starts from it: the data's ids, or with the
        environment's tools rendered in (then checked against ``data.max_prompt_len``)."""
        if not self.tools:
            return list(p.ids)
        key = tuple(p.ids)  # the same prompt comes back every epoch: tokenized once
        if key in self._with_tools:
            return list(self._with_tools[key])
        ids = self.assembler.encode_prompt(prompt_messages(
            p.prompt if p.prompt is not None else p.text))
        if len(ids) > self.max_prompt_len:
            raise ConfigError(f"data.max_prompt_len = {self.max_prompt_len}: a prompt with the "
                              f"environment's tool schemas is {len(ids)} tokens; raise "
                              "data.max_prompt_len (the schemas are part of every prompt)")
        self._with_tools[key] = tuple(ids)
        return ids

    def check_prompts(self, prompts: list[PromptItem]) -> None:
        """Every prompt fits with the tools rendered in (before any worker starts)."""
        if self.tools:
            for p in prompts:
                self.prompt_ids(p)

    @staticmethod
    def row(p: PromptItem) -> dict[str, Any]:
        return dict(p.metadata, prompt=p.prompt, answer=p.answer)

    def run(self, engine, prompts: list[PromptItem], params: SamplingParams,
            weight_version: int | None = None
            ) -> tuple[list[RolloutOutput], dict[str, float], list[Trajectory]]:
        """``params.n`` trajectories per prompt on ``engine`` (a rollout group: its
        ``generate(ids, params, weight_version=)``); returns them as engine outputs (one per
        prompt), the batch's ``agent/*`` metrics, and the trajectories."""
        n = params.n
        starts = [(ids, prompt_messages(p.prompt if p.prompt is not None else p.text),
                   self.row(p)) for p in prompts for ids in [self.prompt_ids(p)]
                  for _ in range(n)]

        def generate(contexts, sp):
            if weight_version is None:
                return engine.generate(contexts, sp)
            return engine.generate(contexts, sp, weight_version=weight_version)

        if self.program is not None:  # an OpenAI-API agent drives its own conversation
            trajs, metrics = run_program_rollouts(generate, starts, self.program,
                                                  self.assembler, params, self.settings)
        else:
            trajs, metrics = run_agent_rollouts(generate, starts, self.make_env,
                                                self.assembler, params, self.settings)
        if self.tools:  # the prompts differ from the data's ids: each sample carries its own
            for t in trajs:
                t.extended_prompt = True
        return trajectory_outputs(trajs, n), metrics, trajs

    def evaluate(self, engine, prompts: list[PromptItem], params: SamplingParams
                 ) -> dict[str, float]:
        """Greedy trajectories on held-out prompts: ``eval/accuracy`` (the share the
        environment reports ``correct``, else with a positive reward), ``eval/reward_mean``,
        ``eval/tool_call_rate`` (trajectories that called a tool) and the agent metrics."""
        prompts = [p for p in prompts if p.answer is not None]
        if not prompts:
            return {}
        _, m, trajs = self.run(engine, prompts, params)
        correct = [float(t.info["correct"]) if "correct" in t.info else float(t.reward > 0)
                   for t in trajs]
        out = {"eval/accuracy": sum(correct) / len(trajs),
               "eval/reward_mean": sum(t.reward for t in trajs) / len(trajs),
               "eval/tool_call_rate": sum(float(t.info.get("tool_calls", 0) or 0) > 0
                                          for t in trajs) / len(trajs),
               "eval/num_prompts": float(len(prompts))}
        out.update({f"eval/{k}": v for k, v in m.items()})
        return out
