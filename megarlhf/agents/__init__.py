"""Multi-turn, tool-using agents: environments (:mod:`.env`, built-ins in :mod:`.builtins`),
token-exact trajectories (:mod:`.trajectory`) and the rollout that runs them (:mod:`.rollout`).
"""

from megarlhf.agents.env import (
    BUILTIN_ENVS,
    EnvError,
    Environment,
    StepResult,
    env_class,
    make_env_factory,
)
from megarlhf.agents.rollout import AgentSettings, run_agent_rollouts, trajectory_outputs
from megarlhf.agents.trajectory import TemplateError, TokenAssembler, Trajectory

__all__ = ["BUILTIN_ENVS", "EnvError", "Environment", "StepResult", "env_class",
           "make_env_factory", "AgentSettings", "run_agent_rollouts", "trajectory_outputs",
           "TemplateError", "TokenAssembler", "Trajectory"]
