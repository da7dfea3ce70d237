from pathlib import Path

from setuptools import setup

setup(
    name="dyndepth",
    version="0.1.0",
    description="Dynamic-depth residual networks: RL policies that skip residual blocks per input",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["backbone", "backbone.models", "backbone.data", "backbone.training", "envs", "agents", "experiments"],
    package_data={"experiments": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "gymnasium>=1.0",
        "stable-baselines3>=2.4",
        "tensorboard>=2.14",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    # ray.tune.RunConfig / FailureConfig / report arrived in Ray 2.41; tested with 2.60.
    extras_require={"sweep": ["ray[tune]>=2.41"], "test": ["pytest>=7.4", "pytest-timeout>=2.1", "ray[tune]>=2.41"]},
)
