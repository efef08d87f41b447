from setuptools import find_packages, setup

setup(
    name="megatron_sapo",
    version="0.1.0",
    description="SAPO reinforcement learning for Mixture-of-Experts LLMs on Megatron-Core, with SGLang rollouts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sapo", "megatron_sapo.*"]),
    install_requires=[
        "torch>=2.6",
        # megatron-core by interpreter: 0.16.1 is the newest for Python 3.11, 0.17+ needs 3.12. Both pairs are tested
        # (README: "megatron-core versions"); megatron_sapo/parallel/mcore_compat.py holds every difference.
        "megatron-core>=0.15,<0.17; python_version<'3.12'",
        "megatron-core>=0.19.2,<0.20; python_version>='3.12'",
        # megatron-core's async checkpoint writer imports psutil without declaring it; without it the
        # writer child dies and dist_checkpointing.save waits forever.
        "psutil",
        "transformers>=4.51",
        "safetensors",
        "sentencepiece",
        "omegaconf>=2.3",
        "tqdm",
        "numpy",
        "pyarrow>=14",  # Parquet prompt sets (verl's format)
        "math-verify>=0.9",  # symbolic answer checking for the math reward
        "aiohttp>=3.9",  # the rollout client and the embedded rollout server
        "huggingface_hub",  # model.path=org/name: Hub ids resolved to a local snapshot (megatron_sapo/hub.py)
        "xxhash>=3",  # checkpoint manifests' checksums (XXH3)
    ],
    extras_require={
        # GPU clusters only, in a venv of its own: sglang pins its own torch/CUDA stack (0.5.23: torch==2.14.1).
        # The one release the rollout code is written and tested against (tests/test_sglang_conformance.py reads
        # its source); 0.5.23 has no "srt" extra. Transformer Engine and NVIDIA apex come from the NGC PyTorch
        # container or from source; PyPI's "apex" is an unrelated project.
        "sglang": ["sglang==0.5.23"],
        "dev": ["pytest>=8", "pytest-timeout", "ruff", "matplotlib"],
    },
    entry_points={"console_scripts": ["megatron-sapo=megatron_sapo.cli:main"]},
)
