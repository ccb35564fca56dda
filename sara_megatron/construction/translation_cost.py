"""What a translation run costs: a price table per model, and a token estimate before sending.

Prices are USD per million tokens (input, output) for the standard API; the Batch API costs half.
They are the list prices the project was written against — check the provider's current ones and
override them with a JSON file (`{"gpt-5-mini": {"input": 0.25, "output": 2.0}}`). A model
missing from the table (e.g. a self-hosted vLLM model) costs 0 unless the file names it.

The estimate before a request: about 4 UTF-8 bytes per token for what is sent; the reply is
the source's tokens times an expansion factor of the target language (Indic scripts take more
tokens for the same text), plus the hidden reasoning tokens of a reasoning model (a share of the
reply by `reasoning_effort`). After the run, the reported cost is from the usage the server
returned, not from this estimate.

The context limit: a sample is sent only if each of its requests fits the model's context window,
counted by the same estimate (the prompt's tokens plus the expected reply's, reasoning included),
since the served model's tokenizer is not at hand. The windows of the models in the price table
are below; a model not there (a self-hosted one) gets `DEFAULT_CONTEXT_TOKENS`.
"""

from __future__ import annotations

import json
import os
import re

from sara_megatron.tool_errors import InputError

DEFAULT_PRICES_PER_MILLION = {
    "gpt-5": (1.25, 10.0),
    "gpt-5-mini": (0.25, 2.0),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.0),
    "gpt-4o-mini": (0.15, 0.60),
}
# Tokens of prompt + reply a request may hold (the providers' context windows).
CONTEXT_TOKENS = {
    "gpt-5": 400_000, "gpt-5-mini": 400_000, "gpt-5-nano": 400_000,
    "gpt-4.1": 1_047_576, "gpt-4.1-mini": 1_047_576, "gpt-4.1-nano": 1_047_576,
    "gpt-4o": 128_000, "gpt-4o-mini": 128_000,
}
DEFAULT_CONTEXT_TOKENS = 32_768
BATCH_DISCOUNT = 0.5
OUTPUT_EXPANSION = {"hi": 2.0, "ne": 2.0, "bn": 2.0, "te": 2.5, "sw": 1.3, "en": 1.0, "zh": 1.0}
REASONING_SHARE = {"none": 0.0, "minimal": 0.0, "low": 0.5, "medium": 1.5, "high": 3.0}
_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def approx_tokens(text: str) -> int:
    """An estimate of a text's tokens: its UTF-8 bytes / 4, at least 1.

    Args:
        text: Any text.
    """
    return max(1, len(text.encode("utf-8")) // 4)


def _by_model(table: dict, model: str):
    """`model`'s entry: the name as given, without a provider prefix, or without a date suffix."""
    name = model.split("/")[-1]
    return table.get(model) or table.get(name) or table.get(_DATE_SUFFIX.sub("", name))


def context_tokens(model: str) -> int:
    """The context window of a model in tokens (`DEFAULT_CONTEXT_TOKENS` for one not known).

    Args:
        model: The model name (a provider prefix or a date suffix is ignored).
    """
    return _by_model(CONTEXT_TOKENS, model) or DEFAULT_CONTEXT_TOKENS


class PriceTable:
    """USD per million tokens, input and output, by model: the built-in prices and a file's.

    Args:
        overrides_path: A JSON file `{model: {"input": usd, "output": usd}}` whose entries
            replace or add to the built-in ones.

    Raises:
        ValueError: A file that is not that shape.
    """

    def __init__(self, overrides_path: str | os.PathLike | None = None):
        self.prices = dict(DEFAULT_PRICES_PER_MILLION)
        if overrides_path is not None:
            with open(overrides_path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise InputError(f"{overrides_path}: a JSON object of model -> {{input, output}}")
            for model, price in data.items():
                try:
                    self.prices[model] = (float(price["input"]), float(price["output"]))
                except (TypeError, KeyError, ValueError):
                    raise InputError(f"{overrides_path}: {model!r} needs numbers 'input' and "
                                     "'output' (USD per million tokens)") from None

    def per_million(self, model: str) -> tuple[float, float] | None:
        """A model's prices.

        Args:
            model: The model name (a provider prefix or a date suffix is ignored).

        Returns:
            (input, output) USD per million tokens, or None for a model without a price.
        """
        return _by_model(self.prices, model)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        """What a request costs.

        Args:
            model: The model name.
            prompt_tokens, completion_tokens: The request's usage.
            batch: At the Batch API's price (half).

        Returns:
            USD (0 for a model without a price).
        """
        price = self.per_million(model)
        if price is None:
            return 0.0
        scale = BATCH_DISCOUNT if batch else 1.0
        return scale * (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6


def estimate_tokens(system: str, user: str, target_language: str,
                    reasoning_effort: str | None, reasoning_model: bool) -> tuple[int, int]:
    """The tokens expected for one translation request.

    Args:
        system: The system message.
        user: The user message (the texts to translate).
        target_language: Decides the reply's expansion over the source (`OUTPUT_EXPANSION`).
        reasoning_effort: A reasoning model's effort (its thinking adds `REASONING_SHARE`).
        reasoning_model: Whether the model thinks before it answers.

    Returns:
        (prompt tokens, completion tokens).
    """
    prompt = approx_tokens(system) + approx_tokens(user) + 8
    reply = int(approx_tokens(user) * OUTPUT_EXPANSION.get(target_language, 1.5))
    if reasoning_model:
        reply += int(reply * REASONING_SHARE.get(reasoning_effort or "medium", 1.5))
    return prompt, reply
