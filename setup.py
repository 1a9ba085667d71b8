"""megarlhf: RLHF (PPO, GRPO, online DPO, reward models) on megatron-core, with Ray and vLLM."""

from setuptools import find_packages, setup

# Versions that were tested together (CPU: tools/install_cpu.sh; GPU: the Dockerfile).
INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core==0.16.1",
    "numpy",
    "packaging",
    "psutil",
    "ray[default]==2.60.0",
    "sentencepiece>=0.2",
    "tensorboard>=2.15",
    "transformers==5.19.0",
    "safetensors>=0.4",
    "omegaconf>=2.3",
    "tqdm",
    "pyarrow",
    "math-verify>=0.7",
    "matplotlib>=3.7",  # `megarlhf study` plots (imported only by megarlhf/study/plot.py)
]

EXTRAS = {
    # The GPU stack. transformer-engine comes with the NGC PyTorch base image (see Dockerfile);
    # it is listed for bare-metal installs. vLLM is pinned: megarlhf/rollout/vllm_engine.py follows
    # this version's API exactly.
    "gpu": ["vllm==0.32.0", "transformer-engine[pytorch]>=2.6"],
    "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6"],
}

setup(
    name="megarlhf",
    version="0.1.0",
    description="RLHF trainer for Megatron-scale models: PPO, GRPO, online DPO, reward models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megarlhf", "megarlhf.*"]),
    package_data={"megarlhf": ["py.typed", "demo/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megarlhf=megarlhf.cli:main"]},
)
