"""Config rules that catch settings a job would accept and then misuse (issue 15).

Each function returns a list of messages (one per problem, naming the field and the fix);
:func:`megarlhf.config.validate.validate` adds them to its own:

* :func:`arch_errors` - ``model.arch`` fields the model family does not have (a typo such as
  ``num_hidden_layer`` was silently ignored and the default used), and non-finite numbers;
* :func:`unused_role_errors` - a ``critic:`` / ``reference:`` / ``reward_model:`` section the
  job does not start (its settings would be ignored without a word);
* :func:`model_source_errors` - FP8 with the local layer implementation (FP8 GEMMs are
  Transformer Engine's), and ``model.checkpoint``, which no job loads yet;
* :func:`batch_memory_errors` - batches the driver cannot hold (``n_samples_per_prompt=1e9``).

Nothing here reads files or depends on the machine; those checks are
:mod:`megarlhf.planning.preflight`'s.
"""

from __future__ import annotations

import difflib
import math
from megarlhf.config.roles import active_roles, sequence_tokens
from megarlhf.config.schema import JobConfig, ModelConfig

# HF config fields every family accepts though its config class does not list them (older
# names transformers still reads, generic PretrainedConfig fields, bookkeeping of config.json).
_GENERIC_ARCH_KEYS = frozenset({
    "model_type", "architectures", "transformers_version", "_name_or_path", "torch_dtype",
    "dtype", "rope_theta", "rope_scaling", "num_labels", "id2label", "label2id",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "tie_word_embeddings",
    "use_cache", "attn_implementation", "_attn_implementation", "tokenizer_class",
    "problem_type", "initializer_range",
    # Read through getattr by transformers' and megarlhf's model code although some config
    # classes do not declare it (Qwen3-MoE: head_dim 128 with hidden 2048 and 32 heads).
    "head_dim",
})

# The driver holds a whole rollout (or training) batch in host memory: token ids, masks and
# about six per-token float fields (behaviour / old / reference log-probs, advantages, returns,
# values) - 48 bytes per token is a floor. A batch past this budget is a typo, not a plan.
DRIVER_BYTES_PER_TOKEN = 48
DRIVER_BATCH_LIMIT_GIB = 256


def _role_models(job: JobConfig) -> list[tuple[str, ModelConfig]]:
    """``(dotted path of the model section, model)`` of every section that gives a model."""
    out = [("actor.model", job.actor.model)]
    for name in ("critic", "reference", "reward_model"):
        role = getattr(job, name)
        if role is not None and role.model is not None:
            out.append((f"{name}.model", role.model))
    return out


def known_arch_keys(model_type: str) -> frozenset[str] | None:
    """The HF config fields of ``model_type`` (None when transformers does not know it)."""
    import inspect

    try:
        from transformers import CONFIG_MAPPING

        cls = CONFIG_MAPPING[model_type]
    except (KeyError, ImportError):
        return None
    keys = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    try:
        keys |= set(cls().to_dict())
    except Exception:  # noqa: BLE001 - a config class without usable defaults
        pass
    keys |= set(getattr(cls, "attribute_map", {}) or {})
    return frozenset(keys | _GENERIC_ARCH_KEYS)


def arch_errors(job: JobConfig) -> list[str]:
    """Unknown or non-finite ``model.arch`` fields, each with the nearest valid name."""
    errors: list[str] = []
    for where, model in _role_models(job):
        if model.arch is None:
            continue
        for k, v in model.arch.items():
            if isinstance(v, float) and not math.isfinite(v):
                errors.append(f"{where}.arch.{k} = {v}: not a finite number; give a finite value")
        model_type = model.arch.get("model_type")
        if not isinstance(model_type, str):
            continue  # the architecture check names the missing model_type
        known = known_arch_keys(model_type)
        if known is None:
            continue
        for k in model.arch:
            if k in known:
                continue
            near = difflib.get_close_matches(str(k), sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {where}.arch.{near[0]}?" if near else \
                f"; remove it (the {model_type} fields are those of its config.json)"
            errors.append(f"{where}.arch.{k}: {model_type} models have no field {k!r}{hint}")
    return errors


def unused_role_errors(job: JobConfig) -> list[str]:
    """Role sections the job does not start: their settings would be silently ignored."""
    started = set(active_roles(job))
    errors = []
    why = {
        "critic": "only kind=ppo trains a critic",
        "reference": ("kind=sft, rm and bon run no reference" if job.kind in ("sft", "rm", "bon")
                      else "the reference runs only with algorithm.kl_coef > 0 or "
                           "algorithm.track_kl=true"),
        "reward_model": ("kind=sft and rm score nothing with a reward model (kind=rm trains the "
                         "`actor` section)" if job.kind in ("sft", "rm")
                         else "reward.sources has no 'rm'"),
    }
    for name in ("critic", "reference", "reward_model"):
        if getattr(job, name) is not None and name not in started:
            errors.append(f"{name}: this kind={job.kind} job does not start a {name} "
                          f"({why[name]}); remove the `{name}:` section")
    return errors


def model_source_errors(job: JobConfig) -> list[str]:
    errors = []
    for where, model in _role_models(job):
        if model.checkpoint is not None:
            # Nothing loads it today: the role would silently start from hf_dir / arch.
            src = f"{where}.hf_dir" if model.hf_dir else f"{where}.arch (random weights)"
            errors.append(f"{where}.checkpoint: jobs do not load a megarlhf checkpoint as a "
                          f"role's weights yet (it would be ignored and the model start from "
                          f"{src}); convert it with `megarlhf convert megatron-to-hf --ckpt "
                          f"{model.checkpoint} --out D` and set {where}.hf_dir=D")
        if model.fp8 is not None and model.transformer_impl == "local":
            errors.append(f"{where}.fp8={model.fp8} runs FP8 GEMMs through Transformer Engine, "
                          f"but {where}.transformer_impl=local builds megatron's local layers; "
                          f"set {where}.transformer_impl=auto (or {where}.fp8=null)")
    return errors


def _gib(n: float) -> str:
    return f"{n / 2**30:,.0f} GiB"


def batch_memory_errors(job: JobConfig) -> list[str]:
    """Batches whose driver-side copy alone exceeds :data:`DRIVER_BATCH_LIMIT_GIB`."""
    limit = DRIVER_BATCH_LIMIT_GIB * 2**30
    errors = []
    if job.kind in ("ppo", "grpo", "dpo"):
        b = job.batch
        seqs = b.rollout_prompts_global * b.n_samples_per_prompt
        tokens, fields = sequence_tokens(job)
        need = seqs * tokens * DRIVER_BYTES_PER_TOKEN
        if need > limit:
            errors.append(
                f"batch: a rollout of batch.rollout_prompts_global * batch.n_samples_per_prompt "
                f"= {b.rollout_prompts_global} * {b.n_samples_per_prompt} = {seqs:,} sequences of "
                f"up to {fields.split(' = ')[0]} = {tokens} tokens needs "
                f"about {_gib(need)} on the driver (over {DRIVER_BATCH_LIMIT_GIB} GiB); lower "
                "batch.n_samples_per_prompt (N, e.g. 4-64) or batch.rollout_prompts_global")
    elif job.kind == "bon" and job.bon.num_prompts is not None:
        seqs = job.bon.num_prompts * max(job.bon.n_values)
        need = seqs * sequence_tokens(job)[0] * DRIVER_BYTES_PER_TOKEN
        if need > limit:
            errors.append(f"bon: bon.num_prompts * max(bon.n_values) = {seqs:,} samples need about "
                          f"{_gib(need)} on the driver; lower bon.n_values or bon.num_prompts")
    elif job.kind in ("sft", "rm"):
        t = job.train
        need = t.global_batch_size * t.max_seq_len * DRIVER_BYTES_PER_TOKEN
        if need > limit:
            errors.append(f"train: a step of train.global_batch_size={t.global_batch_size:,} "
                          f"sequences of train.max_seq_len={t.max_seq_len:,} tokens needs about "
                          f"{_gib(need)} on the driver; lower train.global_batch_size")
    return errors


def extra_rule_errors(job: JobConfig) -> list[str]:
    """Every rule of this module (what :func:`~megarlhf.config.validate.validate` adds)."""
    return (arch_errors(job) + unused_role_errors(job) + model_source_errors(job)
            + batch_memory_errors(job))
