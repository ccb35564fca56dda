"""Evaluation as the paper ran it: benchmarks, the `\\boxed{}` prompts, our runner (OpenAI-compatible
server or in-process transformers), lm-eval task definitions and the significance tests.

Submodules are imported where used (`from sara_megatron.evaluation.benchmarks import ...`) so that
reading a benchmark does not pull in transformers or the HTTP client.
"""
