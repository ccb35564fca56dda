"""What the model is asked for one benchmark item, and how its reply is scored.

The prompt is the paper's (Table 8 for Global-MMLU, 9 for BELEBELE, 10 for MGSM); the reply is
scored by its last complete `\\boxed{}`: an option letter for the multiple-choice benchmarks, a
number for MGSM (`sara_megatron.answers`, the rule corpus construction uses too).
"""

from __future__ import annotations

from typing import Mapping

from sara_megatron.answers import answer_is_correct, last_boxed
from sara_megatron.evaluation.benchmarks import BenchmarkItem
from sara_megatron.prompts import math_prompt, multiple_choice_prompt, passage_prompt

MULTIPLE_CHOICE_BENCHMARKS = ("global_mmlu", "belebele")


def item_prompt(item: BenchmarkItem, template_language: str = "en",
                templates: Mapping | None = None) -> str:
    """The user message for an item: the paper's prompt of its kind (passage, choices, math).

    Args:
        item: The benchmark item.
        template_language: The instructions' language ("en", or one of `templates`).
        templates: Translated templates (`prompts.load_templates`); None: English.
    """
    if item.benchmark == "belebele":
        return passage_prompt(item.passage or "", item.question, item.options,
                              template_language, templates)
    if item.options:
        return multiple_choice_prompt(item.question, item.options, template_language, templates)
    return math_prompt(item.question, template_language, templates)


def item_messages(item: BenchmarkItem, template_language: str = "en",
                  templates: Mapping | None = None) -> list[dict]:
    """The chat the model sees: the prompt as the one user turn (its chat template does the rest).

    Args:
        item: The benchmark item.
        template_language: The instructions' language ("en", or one of `templates`).
        templates: Translated templates (`prompts.load_templates`); None: English.
    """
    return [{"role": "user", "content": item_prompt(item, template_language, templates)}]


def score_output(item: BenchmarkItem, output: str) -> tuple[str | None, bool]:
    """Score one reply.

    Args:
        item: The benchmark item.
        output: The model's reply.

    Returns:
        (the last \\boxed{} content or None, whether it is the gold answer).
    """
    extracted = last_boxed(output)
    return extracted, answer_is_correct(extracted, item.gold, item.options or None)
