"""Install diffusers-stages: `pip install torch==2.13.0 && pip install -e ".[test]"`, then run `diffusers-stages demo`."""

from setuptools import find_packages, setup

# `pipelines/` and `conversion/` live at the repository top level but install *inside* the library,
# as `diffusers_stages.pipelines` and `diffusers_stages.conversion`: never as bare top-level packages.
LIBRARY_PACKAGES = find_packages(include=["diffusers_stages", "diffusers_stages.*"])
MAPPED = {"pipelines": "diffusers_stages.pipelines", "conversion": "diffusers_stages.conversion"}
mapped_packages = []
for folder, package in MAPPED.items():
    mapped_packages.append(package)
    mapped_packages += [f"{package}.{sub}" for sub in find_packages(where=folder)]

setup(
    name="diffusers-stages",
    version="0.1.0",
    description="Stage-wise diffusion models for diffusers: multi-stage multi-decoder U-Nets, multi-expert and dual-backbone routing.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=LIBRARY_PACKAGES + mapped_packages,
    package_dir={"diffusers_stages": "diffusers_stages", **{pkg: folder for folder, pkg in MAPPED.items()}},
    install_requires=[
        "torch>=2.6",  # 2.6: weights-only loading without the CVE-2025-32434 bypass
        "diffusers>=0.42.1",
        "transformers>=4.46",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface-hub>=0.34",
        "numpy>=1.26",
        "scipy>=1.9",  # scipy.optimize.milp (HiGHS): the budget planner's knapsack (`plan_stages(..., budget=...)`)
        "tqdm>=4.66",
        "pillow>=10.0",
        "matplotlib>=3.8",
        "scikit-learn>=1.4",  # the demo's data (sklearn digits ship in the wheel: no download)
        "torchmetrics>=1.4",  # the Frechet distance of `diffusers_stages.evaluation`
    ],
    extras_require={
        "test": ["pytest>=8.0", "tensorboard>=2.15", "datasets>=2.19", "ruff>=0.17,<0.18", "peft>=0.17"],
    },
    entry_points={
        "console_scripts": [
            "diffusers-stages=diffusers_stages.cli:main",
            "diffusers-stages-plan=diffusers_stages.plan:main",
            "diffusers-stages-switch=diffusers_stages.switch:cli",
        ]
    },
)
