"""The transformers rollout engine, for debugging (``rollout.engine: hf``).

A ``transformers`` causal LM is built from an HF config — a dict, a ``PretrainedConfig`` or a
local HF directory — with random weights; real weights arrive through ``update_weights`` (the
trainer's HF-named stream) or, for a directory, from its ``*.safetensors`` files.

Generation is our own batched sampling loop around the model's forward with a KV cache
(``DynamicCache``), so that every number is computed exactly as :mod:`megarlhf.rollout.base`
defines it:

* the ``R = prompts * n`` rows are left-padded to one length ``P``; the attention mask hides the
  padding and position ids count real tokens only (``pos = cumsum(mask) - 1``), so a padded row
  sees the same positions as it would alone;
* prefill runs once over ``(R, P)``; each decode step feeds the ``(R, 1)`` sampled tokens with
  the mask grown by one column and positions advanced by one;
* log-probs are ``log_softmax(logits / T)`` over the full vocabulary at the sampled token, in
  fp32, taken before top-k/top-p filtering (greedy: ``T = 1``);
* sample ``i`` of prompt ``j`` draws from its own ``torch.Generator`` seeded ``seed + j*n + i``,
  so a row's samples do not depend on how rows are chunked into batches.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from megarlhf.rollout.base import (
    RolloutEngine,
    RolloutOutput,
    Sample,
    SamplingParams,
    WeightManifest,
    WeightUpdateStats,
    token_logprobs,
    validate_prompts,
)

logger = logging.getLogger(__name__)


def _build_config(model):
    """An HF config from a config dict, a ``PretrainedConfig`` or a local HF directory."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return copy.deepcopy(model)
    if isinstance(model, Mapping):
        fields = dict(model)
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ValueError(
                "an HF config dict needs a 'model_type' (e.g. 'llama', 'qwen2') to pick the "
                "model class"
            )
        return AutoConfig.for_model(model_type, **fields)
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise ValueError(
                f"HF rollout engine: {path!r} is not a local directory; pass a config dict, a "
                "transformers.PretrainedConfig or a directory with config.json (no hub access)"
            )
        return AutoConfig.from_pretrained(path, local_files_only=True)
    raise TypeError(
        "HF rollout engine: model must be a config dict, a transformers.PretrainedConfig or a "
        f"local HF directory, got {type(model).__name__}"
    )


def _iter_safetensors(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of a directory's ``*.safetensors`` files one at a time."""
    from safetensors import safe_open

    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _on_disk_names(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint (on-disk) names: transformers 5 keeps an MoE
    layer's experts fused in memory (``experts.gate_up_proj`` ``(E, 2F, H)``), checkpoints and
    megarlhf's stream name each expert; each on-disk name maps to a view of the fused tensor
    (written in place). Dense models pass unchanged."""
    from megarlhf.models.families import MOE_FAMILIES, arch_spec, hf_experts_fused_to_disk

    if getattr(config, "model_type", None) not in MOE_FAMILIES:
        return state
    return hf_experts_fused_to_disk(state, arch_spec(config))


class HFRolloutEngine(RolloutEngine):
    """Batched sampling with a KV cache on a ``transformers`` causal LM.

    Args:
        model: a config dict (with ``model_type``), a ``transformers.PretrainedConfig``, or a
            local HF directory (config.json, and weights from its ``*.safetensors`` if any).
        dtype: parameter and activation dtype; fp32 on CPU. Streamed tensors must have it.
        device: where the model runs.
        attn_implementation: transformers attention backend ("sdpa" or "eager").
        max_batch_rows: most sequences (prompts x n) in one forward batch; larger calls are
            processed in chunks of this many rows (results do not depend on it).
        load_directory_weights: when ``model`` is a directory, load its safetensors.
    """

    def __init__(
        self,
        model,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        max_batch_rows: int = 64,
        load_directory_weights: bool = True,
    ):
        from transformers import AutoModelForCausalLM

        if not isinstance(max_batch_rows, int) or max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be a positive integer, got {max_batch_rows!r}")
        config = _build_config(model)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_rows = max_batch_rows
        self.model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
        self.model.to(self.device).eval().requires_grad_(False)
        self.vocab_size = int(self.model.config.vocab_size)

        # HF name -> parameter; tied parameters (lm_head.weight = embed_tokens.weight) appear
        # under every name and map to one canonical name (the first in state_dict order).
        self._params: dict[str, torch.Tensor] = _on_disk_names(
            dict(self.model.state_dict(keep_vars=True)), config)
        first_name: dict[int, str] = {}
        self._canonical: dict[str, str] = {}
        for name, tensor in self._params.items():
            self._canonical[name] = first_name.setdefault(id(tensor), name)
        self._canonical_names: tuple[str, ...] = tuple(first_name.values())
        self._written: set[str] = set()  # canonical names written since construction
        self._asleep = False

        if isinstance(model, (str, os.PathLike)) and load_directory_weights:
            directory = os.fspath(model)
            if glob.glob(os.path.join(directory, "*.safetensors")):
                stats = self._copy_stream(_iter_safetensors(directory), cast=True)
                logger.info("HF rollout engine: loaded %s: %s", directory, stats.summary())

    # ------------------------------------------------------------------ weights

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> WeightUpdateStats:
        """Copy each streamed ``(hf_name, tensor)`` into the parameter of that name.

        Names, shapes and dtypes must match the model exactly; the error names the tensor. For
        tied embeddings ``lm_head.weight`` may be absent; if it comes with
        ``model.embed_tokens.weight`` in the same call, the two must be equal. Only the tensor
        being copied is held beyond the model. Returns the call's :class:`WeightUpdateStats`;
        its ``missing`` lists the parameters this call did not cover.
        """
        stats = self._copy_stream(named_tensors, cast=False)
        logger.info("HF rollout engine: weight update: %s", stats.summary())
        return stats

    def weight_manifest(self) -> WeightManifest:
        """Every HF name of the model with its shape; tied aliases (lm_head) are optional."""
        shapes = {n: tuple(t.shape) for n, t in self._params.items()}
        aliases = {n for n, c in self._canonical.items() if c != n}
        return WeightManifest(shapes=shapes, optional=frozenset(aliases))

    def missing_weights(self) -> list[str]:
        """Parameters never written since construction (they still hold random values)."""
        return [n for n in self._canonical_names if n not in self._written]

    def _copy_stream(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, cast: bool
    ) -> WeightUpdateStats:
        start = time.perf_counter()
        count = nbytes = 0
        written: dict[str, str] = {}  # canonical name -> the streamed name that wrote it
        with torch.no_grad():
            for item in named_tensors:
                name, tensor = item
                target = self._params.get(name) if isinstance(name, str) else None
                if target is None:
                    examples = ", ".join(self._canonical_names[:3])
                    raise ValueError(
                        f"update_weights: unknown tensor {name!r}: the model has no parameter "
                        f"of that name (HF names are expected, e.g. {examples})"
                    )
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(
                        f"update_weights: {name!r} is a {type(tensor).__name__}, not a tensor"
                    )
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                        f"model's parameter has shape {tuple(target.shape)} (full, unsharded HF "
                        "layouts are expected)"
                    )
                if tensor.dtype != target.dtype:
                    if not cast:
                        raise ValueError(
                            f"update_weights: tensor {name!r} has dtype {tensor.dtype}, the "
                            f"engine was built with {target.dtype}; build it with "
                            f"dtype={tensor.dtype} or cast the stream"
                        )
                    tensor = tensor.to(target.dtype)
                canonical = self._canonical[name]
                if canonical in written:
                    # A tied alias already written in this call: it must carry the same values.
                    if not torch.equal(target, tensor.to(target.device)):
                        raise ValueError(
                            f"update_weights: {name!r} is tied to {written[canonical]!r} in "
                            "this model, but the stream carries different values for them "
                            "(an untied checkpoint into a model with tie_word_embeddings=True?)"
                        )
                else:
                    target.copy_(tensor)
                    written[canonical] = name
                count += 1
                nbytes += tensor.numel() * tensor.element_size()
                item = tensor = None  # hold nothing but the model between tensors
        self._written.update(written)
        missing = tuple(n for n in self._canonical_names if n not in written)
        return WeightUpdateStats(
            tensors=count,
            bytes=nbytes,
            seconds=time.perf_counter() - start,
            buckets=count,
            missing=missing,
        )

    # --------------------------------------------------------------- lifecycle

    def sleep(self) -> None:
        """On an accelerator, move the model to host memory; on CPU only marks the state."""
        if not self._asleep and self.device.type != "cpu":
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._asleep = True

    def wake_up(self) -> None:
        if self._asleep and self.device.type != "cpu":
            self.model.to(self.device)
        self._asleep = False

    def reset_prefix_cache(self) -> None:
        """Nothing to do: no KV cache outlives a ``generate`` call."""

    # --------------------------------------------------------------- generation

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[RolloutOutput]:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be megarlhf SamplingParams, got {type(params).__name__}")
        if self._asleep:
            raise RuntimeError("HF rollout engine: generate() while asleep; call wake_up() first")
        validate_prompts(prompt_token_ids, self.vocab_size)
        base_seed = params.seed if params.seed is not None else secrets.randbits(62)
        n = params.n
        # Row r = j * n + i is sample i of prompt j.
        rows = [list(p) for p in prompt_token_ids for _ in range(n)]
        samples: list[Sample] = []
        for lo in range(0, len(rows), self.max_batch_rows):
            chunk = rows[lo : lo + self.max_batch_rows]
            seeds = [base_seed + lo + k for k in range(len(chunk))]
            samples.extend(self._generate_rows(chunk, seeds, params))
        return [
            RolloutOutput(prompt_token_ids=p, samples=tuple(samples[j * n : (j + 1) * n]))
            for j, p in enumerate(prompt_token_ids)
        ]

    @torch.inference_mode()
    def _generate_rows(
        self, rows: list[list[int]], seeds: list[int], params: SamplingParams
    ) -> list[Sample]:
        from transformers import DynamicCache

        num_rows, max_len = len(rows), max(len(r) for r in rows)
        dev = self.device
        input_ids = torch.zeros(num_rows, max_len, dtype=torch.long)  # (R, P), pads are id 0
        mask = torch.zeros(num_rows, max_len, dtype=torch.long)  # (R, P)
        for r, prompt in enumerate(rows):
            input_ids[r, max_len - len(prompt) :] = torch.tensor(prompt)
            mask[r, max_len - len(prompt) :] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (R, P): real tokens count from 0
        generators = None
        if not params.greedy:
            generators = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=dev)

        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].float()  # (R, V): left padding puts every prompt's end here
        next_pos = positions[:, -1] + 1  # (R,)

        tokens: list[list[int]] = [[] for _ in rows]
        logps: list[list[float]] = [[] for _ in rows]
        reasons: list[str | None] = [None] * num_rows
        for step in range(params.max_new_tokens):
            tok = self._sample(logits, params, generators)  # (R,)
            lp = token_logprobs(logits, tok, params.temperature) if params.logprobs else None
            is_stop = torch.isin(tok, stop_ids).tolist()
            tok_list = tok.tolist()
            lp_list = lp.tolist() if lp is not None else None
            for r in range(num_rows):
                if reasons[r] is not None:
                    continue  # finished rows keep being fed, their tokens are dropped
                tokens[r].append(tok_list[r])
                if lp_list is not None:
                    logps[r].append(lp_list[r])
                if is_stop[r]:
                    reasons[r] = "stop"
                elif step + 1 == params.max_new_tokens:
                    reasons[r] = "length"
            if all(reason is not None for reason in reasons):
                break
            mask = torch.cat([mask, mask.new_ones(num_rows, 1)], dim=-1)  # (R, P + step + 1)
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :].float()  # (R, V)
            next_pos = next_pos + 1
        return [
            Sample(
                token_ids=tokens[r],
                logprobs=logps[r] if params.logprobs else None,
                finish_reason=reasons[r],
            )
            for r in range(num_rows)
        ]

    @staticmethod
    def _sample(
        logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None
    ) -> torch.Tensor:
        """Draw one token per row from ``logits`` (R, V): argmax, or temperature + top-k/top-p.

        Filtering follows vLLM's PyTorch sampler: top-k keeps logits >= the k-th largest; top-p
        then drops the least likely tokens whose cumulative probability is <= 1 - p, always
        keeping the most likely one.
        """
        if params.greedy:
            return logits.argmax(dim=-1)
        z = logits / params.temperature  # (R, V)
        vocab = z.shape[-1]
        if params.top_k_enabled and params.top_k < vocab:
            kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]  # (R, 1)
            z = z.masked_fill(z < kth, float("-inf"))
        if params.top_p < 1:
            sorted_z, order = torch.sort(z, dim=-1)  # ascending
            cum = torch.softmax(sorted_z, dim=-1).cumsum(dim=-1)
            drop_sorted = cum <= 1 - params.top_p
            drop_sorted[:, -1] = False
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            z = z.masked_fill(drop, float("-inf"))
        probs = torch.softmax(z, dim=-1)  # (R, V)
        assert generators is not None
        picks = [
            torch.multinomial(probs[r], 1, generator=generators[r]) for r in range(len(generators))
        ]
        return torch.cat(picks)
