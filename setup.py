"""sara-megatron: SARA routing alignment for MoE LLMs on Megatron-Core."""

from setuptools import find_packages, setup

# `kernels/` lives at the top level (the user's layout) but is imported as `sara_megatron.kernels`:
# a top-level package named `kernels` would shadow Hugging Face's `kernels` package.
packages = find_packages(include=["sara_megatron", "sara_megatron.*"])
packages += ["sara_megatron.kernels"] + [
    "sara_megatron.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="sara-megatron",
    version="0.1.0",
    description="Semantically Anchored Routing Alignment (SARA) for MoE LLMs on Megatron-Core",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"sara_megatron.kernels": "kernels"},
    # lm-eval task definitions ship beside the evaluation code (`lm_eval --include_path`).
    package_data={"sara_megatron.evaluation": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/_*_yaml",
                                              "lm_eval_tasks/*.py"]},
    install_requires=[
        # The newest megatron-core that installs on Python 3.11; its APIs are read from this version.
        "megatron-core==0.16.1",
        # torch is pinned by the Makefile before this install; a range here never pulls a CUDA build
        # when a matching torch is already present.
        "torch>=2.6",
        "triton",
        # <5.25: transformers 5.25 requires Hugging Face's `kernels` package, which this
        # checkout's top-level `kernels/` shadows wherever the repository root is on sys.path
        # (`python -m pytest`, `python -c` there): transformers' activations then fail to import.
        "transformers>=4.56,<5.25",
        "safetensors",
        "numpy",
        "pyyaml",
        # Typed training configs: validation with the offending key's dotted name.
        "pydantic>=2",
        # megatron-core's checkpoint writer imports psutil; einops is used by its attention code.
        "psutil",
        "einops",
        # Training metrics (torch.utils.tensorboard's SummaryWriter).
        "tensorboard",
        # Corpus construction and evaluation: sources and benchmarks through `datasets`, models over
        # the OpenAI wire format (OpenAI or vLLM), the local OpenAI-compatible server (aiohttp),
        # language identification of translations, statistics and figures.
        "datasets",
        "openai>=1.40",
        "aiohttp",
        "tqdm",
        "lingua-language-detector",
        "scipy",
        "matplotlib",
    ],
    extras_require={
        # The range megatron-core 0.16.1 declares for Transformer Engine (its `dev` extra).
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
        # lm-evaluation-harness: our benchmark tasks ship as lm-eval task definitions; the tests
        # check that lm-eval and our runner score the same replies alike.
        "lmeval": ["lm-eval==0.4.13", "tenacity", "accelerate"],
        "dev": ["pytest", "pytest-timeout", "lm-eval==0.4.13", "tenacity", "accelerate"],
        "wandb": ["wandb"],
    },
)
