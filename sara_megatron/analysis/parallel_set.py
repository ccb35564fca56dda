"""What the divergence analysis reads: sequences grouped across languages by a shared id.

A parallel set has an anchor language, target languages, and per language its sequences, each
with the id of its parallel group (a corpus sample id, a benchmark item id): a target sequence is
compared with the anchor sequence of the same group. `ShardParallelSet` reads token shards;
`benchmark_parallel_set.BenchmarkParallelSet` tokenises an evaluation benchmark's prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from sara_megatron.data.token_shards import TokenShards


@dataclasses.dataclass(frozen=True)
class ParallelSequence:
    """One sequence of a parallel set.

    Attributes:
        group_id: The parallel group's id, the same in every language for one sample / question.
        language: The sequence's language.
        prompt_length: The prompt's length in tokens.
        handle: What the set's `tokens` reads the ids from.
    """

    group_id: str  # the same in every language for one sample / question
    language: str
    prompt_length: int
    handle: Any  # what the set's `tokens` reads the ids from


class ParallelSet(Protocol):
    """What the divergence analysis reads.

    Attributes:
        anchor_language: The language every target sequence is compared with.
        target_languages: The languages compared with the anchor.
        seq_length: The padded length training would use.
    """

    anchor_language: str
    target_languages: list[str]
    # Padded length training would use: with Phi-3 longrope every pass is padded to the same
    # side of the rope switch (see models.longrope_padding).
    seq_length: int

    def sequences(self, language: str) -> list[ParallelSequence]:
        """The language's sequences.

        Args:
            language: The anchor or a target language.
        """

    def tokens(self, sequence: ParallelSequence) -> np.ndarray:
        """The sequence's token ids, `[length]`.

        Args:
            sequence: One of this set's sequences.
        """


class ShardParallelSet:
    """Token shards as a parallel set (groups = corpus sample ids).

    Args:
        shards: The token shards.
    """

    def __init__(self, shards: TokenShards):
        self.shards = shards
        self.anchor_language = shards.anchor_language
        self.target_languages = shards.target_languages
        self.seq_length = shards.seq_length

    def sequences(self, language: str) -> list[ParallelSequence]:
        """The language's samples, in shard order.

        Args:
            language: The anchor or a target language.
        """
        return [ParallelSequence(s.meta.sample_id, language, s.meta.prompt_length, s)
                for s in self.shards.samples(language)]

    def tokens(self, sequence: ParallelSequence) -> np.ndarray:
        """The sample's token ids, `[length]`.

        Args:
            sequence: One of this set's sequences.
        """
        return self.shards.tokens(sequence.handle)


def as_parallel_set(data) -> ParallelSet:
    """The data as a parallel set: token shards wrapped, a parallel set as it is.

    Args:
        data: `TokenShards` or a parallel set.
    """
    return ShardParallelSet(data) if isinstance(data, TokenShards) else data
