"""Compatibility layers: every patch of a library's internals, one module per library, each
checked against the installed version when imported (see each module's docstring).

* :mod:`megarlhf.compat.vllm` - vLLM's reload internals, its CPU MoE kernel, log filters.
* :mod:`megarlhf.platform.cpu_compat` - megatron-core and torch.cuda on CPU (only without a GPU).
"""
