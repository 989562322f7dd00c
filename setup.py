from setuptools import find_packages, setup

setup(
    name="fla_cp",
    version="0.1.0",
    description="Exact context parallelism for Gated DeltaNet on top of flash-linear-attention",
    packages=find_packages(include=["fla_cp", "fla_cp.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.7",
        "triton>=3.3",
        "flash-linear-attention>=0.6,<0.7",
        "transformers>=5.6.2,<6",
        "einops",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        # fla_cp.integrations.torchtitan: its Trainer internals and private model builders are used, so the
        # release is pinned (docs/torchtitan.md)
        # transformers>=5.25 too: without it pip fits torchtitan's `datasets<4.8` by taking datasets 4.7 (which caps
        # huggingface-hub below 2) and backtracking transformers to 5.24, where fla_cp's Qwen families are missing;
        # with it pip picks datasets 4.1.1, which works with huggingface-hub 2.4
        "torchtitan": ["torchtitan==0.3.0", "transformers>=5.25"],
    },
)
