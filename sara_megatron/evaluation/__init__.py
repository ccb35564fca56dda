"""Evaluation as the paper ran it: benchmarks, the `\\boxed{}` prompts, our runner (OpenAI-compatible
server or in-process transformers), lm-eval task definitions and the significance tests.

Submodules are imported where used (`from sara_megatron.evaluation.benchmarks import ...`) so that
reading a benchmark does not pull in transformers or the HTTP client.
"""

import os

# lm-eval task definitions of the three benchmarks: `lm_eval --include_path <this> --tasks sara_mgsm`
LM_EVAL_TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
