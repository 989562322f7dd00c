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
    extras_require={"test": ["pytest", "pytest-timeout"]},
)
