"""sara-megatron: SARA routing alignment for MoE LLMs on Megatron-Core."""

from setuptools import find_packages, setup

# The Triton kernels live in the top-level `kernels/` folder (the user's layout) and are imported as
# `sara_megatron.kernels`. `kernels/` itself has no `__init__.py`: a regular top-level package named
# `kernels` would shadow Hugging Face's `kernels` (which transformers imports) wherever the
# repository root is on sys.path; a folder without one is only a namespace portion, which loses to
# an installed regular package. The code sits one level down, in a regular package that is mapped.
KERNELS_SOURCE = "kernels/sara_kernels"
packages = find_packages(include=["sara_megatron", "sara_megatron.*"])
packages += ["sara_megatron.kernels"] + [
    "sara_megatron.kernels." + p for p in find_packages(where=KERNELS_SOURCE)
]

# One console script per tool, `sara-<tool>` (underscores as hyphens), running the same main as
# `python tools/<tool>.py` and `python -m sara_megatron.cli.<tool>` (sara_megatron/cli).
TOOLS = [
    "answer_anchors", "convert_hf", "demo", "evaluate", "experiment", "extract_language_vectors",
    "extract_priors", "filter_correct", "plan_layout", "report", "routing_divergence",
    "routing_report", "shard_corpus", "significance", "train", "translate_corpus",
]

setup(
    name="sara-megatron",
    version="0.1.0",
    description="Semantically Anchored Routing Alignment (SARA) for MoE LLMs on Megatron-Core",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"sara_megatron.kernels": KERNELS_SOURCE},
    # lm-eval task definitions ship beside the evaluation code (`lm_eval --include_path`).
    package_data={"sara_megatron.evaluation": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/_*_yaml",
                                              "lm_eval_tasks/*.py"]},
    entry_points={"console_scripts": [
        f"sara-{t.replace('_', '-')} = sara_megatron.cli.{t}:main" for t in TOOLS]},
    install_requires=[
        # The tested range: 0.16.1 (the newest on Python 3.11) through 0.19.x (Python 3.12); every
        # difference between them lives in sara_megatron/mcore_compat.py (docs/compatibility.md).
        "megatron-core>=0.16.1,<0.20",
        # torch is pinned by the Makefile before this install; a range here never pulls a CUDA build
        # when a matching torch is already present.
        "torch>=2.6",
        "triton",
        # A floor only: 5.25 and later import Hugging Face's `kernels`, which nothing here shadows.
        "transformers>=4.56",
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
        # peft: the tests load the exported LoRA adapter (PEFT's layout) with transformers + peft.
        "dev": ["pytest", "pytest-timeout", "lm-eval==0.4.13", "tenacity", "accelerate", "peft"],
        "wandb": ["wandb"],
    },
)
