"""An evaluation benchmark as a parallel set: each question and its translations form a group.

Global-MMLU keeps one sample id across its language configs, BELEBELE one (link, question number),
MGSM one row index (`evaluation.benchmarks.BenchmarkItem.item_id`), so a target-language item is
compared with the anchor item of the same id — the data of the paper's Figures 2, 5 and 6. Each
item becomes the prompt the model is evaluated on (`evaluation.tasks.item_messages`: the paper's
template, one user turn), rendered by the model's chat template up to the assistant header exactly
as corpus sharding renders a prompt (`data.chat_tokenization.render_conversation`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from sara_megatron.analysis.parallel_set import ParallelSequence
from sara_megatron.data.chat_tokenization import render_conversation
from sara_megatron.data.corpus_format import ChatMessage, ParallelRecord
from sara_megatron.evaluation.benchmarks import BenchmarkItem, load_benchmark
from sara_megatron.evaluation.tasks import item_messages


def prompt_token_ids(tokenizer, item: BenchmarkItem, template_language: str = "en") -> np.ndarray:
    """The item's prompt as the model reads it: chat-templated with the generation prompt.

    Args:
        tokenizer: The model's HF tokenizer (with its chat template).
        item: The benchmark item.
        template_language: The language of the prompt template's instructions.

    Returns:
        The prompt's token ids, int64 `[prompt_length]`.
    """
    messages = tuple(ChatMessage(m["role"], m["content"])
                     for m in item_messages(item, template_language))
    # render_conversation takes a whole exchange; the empty reply only completes the record.
    record = ParallelRecord(item.item_id, item.language, messages + (ChatMessage("assistant", ""),),
                            item.benchmark)
    prompt_text, _ = render_conversation(tokenizer, record)
    # The chat template already wrote any BOS / special tokens into the text.
    return np.asarray(tokenizer(prompt_text, add_special_tokens=False)["input_ids"], dtype=np.int64)


class BenchmarkParallelSet:
    """Tokenised benchmark prompts of the anchor and target languages, grouped by item id.

    Args:
        tokenizer: The model's HF tokenizer (with its chat template).
        benchmark: The benchmark's name (see `evaluation.benchmarks.load_benchmark`).
        anchor_language: The language every target item is compared with.
        target_languages: The languages compared with the anchor; the anchor is not one of them.
        data_dir: A local copy of the benchmark's data; None: the default source.
        limit: At most this many items per language; None: all.
        seq_length: Prompts longer than this many tokens are cut, and it is the training length
            the rope regime follows; None: the longest prompt.
        template_language: The language of the prompt template's instructions.

    Raises:
        ValueError: The anchor language is among the targets, or `seq_length` < 1.
    """

    def __init__(self, tokenizer, benchmark: str, anchor_language: str,
                 target_languages: Sequence[str], data_dir: Optional[str] = None,
                 limit: Optional[int] = None, seq_length: Optional[int] = None,
                 template_language: str = "en"):
        if anchor_language in target_languages:
            raise ValueError(f"{anchor_language!r} is the anchor language; name target languages")
        if seq_length is not None and seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.benchmark = benchmark
        self.anchor_language = anchor_language
        self.target_languages = list(target_languages)
        self._sequences: dict[str, list[ParallelSequence]] = {}
        longest = 1
        for language in [anchor_language, *self.target_languages]:
            rows = []
            for item in load_benchmark(benchmark, language, data_dir, limit):
                ids = prompt_token_ids(tokenizer, item, template_language)
                if seq_length is not None:
                    ids = ids[:seq_length]
                longest = max(longest, len(ids))
                rows.append(ParallelSequence(item.item_id, language, len(ids), ids))
            self._sequences[language] = rows
        self.seq_length = seq_length or longest

    def sequences(self, language: str) -> list[ParallelSequence]:
        """The language's prompts, in benchmark order.

        Args:
            language: The anchor or a target language.

        Raises:
            KeyError: The language was not loaded.
        """
        if language not in self._sequences:
            raise KeyError(f"language {language!r} was not loaded (loaded: "
                           f"{', '.join(self._sequences)})")
        return self._sequences[language]

    def tokens(self, sequence: ParallelSequence) -> np.ndarray:
        """The prompt's token ids, int64 `[prompt_length]`.

        Args:
            sequence: One of this set's sequences.
        """
        return sequence.handle

    def group_counts(self) -> dict[str, int]:
        """Per target language, how many of its items have an anchor item of the same id.

    Returns:
        {target language: number of its items with an anchor counterpart}.
    """
        anchor = {s.group_id for s in self._sequences[self.anchor_language]}
        return {lang: len(anchor & {s.group_id for s in self._sequences[lang]})
                for lang in self.target_languages}
