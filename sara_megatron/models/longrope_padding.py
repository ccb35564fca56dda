"""How far to pad a forward pass so that Phi-3 longrope runs in training's regime.

Longrope gives every position the long factors (and the long mscale) once the padded length passes
`original_max_position_embeddings` (`LongRopeRotaryEmbedding.uses_long_factors`, as transformers
does per batch). Training pads every batch to the shards' seq_length, so a pass that pads only to
its own longest row (prior extraction, the routing-divergence analysis) would measure a short
sample under short or long factors depending on which samples share its batch. Padding by the rule
below keeps each sample in the regime training uses for it, whatever its batch mates.
"""

from __future__ import annotations

from typing import Optional

from sara_megatron.models.phimoe import LongRopeRotaryEmbedding


def round_up(value: int, multiple: int) -> int:
    """The least multiple of `multiple` that is >= `value`.

    Args:
        value: the number to round.
        multiple: a positive integer.
    """
    return -(-value // multiple) * multiple


def longrope_switch(models) -> Optional[int]:
    """The padded length past which the model's rope uses the long factors for every position, or
    None when its rope does not depend on the padded length.

    Args:
        models: the model chunks (their `LongRopeRotaryEmbedding`, if any, is read).
    """
    for chunk in models:
        for module in chunk.modules():
            if isinstance(module, LongRopeRotaryEmbedding):
                return module.longrope.original_max_position_embeddings
    return None


def regime_padded_length(longest: int, multiple: int, train_length: int,
                         switch: Optional[int]) -> int:
    """A batch's padded length: its longest sequence rounded up to `multiple`, and, when training
    (padding to `train_length`) runs past the longrope switch, at least the first multiple past
    it — the regime of training, at the least padding that reaches it. Non-decreasing in
    `longest`, so the maximum over ranks is a step's length.

    Args:
        longest: the batch's longest row, in tokens.
        multiple: the pad multiple.
        train_length: the length training pads every batch to (the shards' seq_length).
        switch: `longrope_switch`, or None when the rope does not depend on the padded length.
    """
    length = round_up(max(longest, 1), multiple)
    if switch is not None and train_length > switch:
        length = max(length, round_up(switch + 1, multiple))
    return length


def same_rope_regime(length: int, other_length: int, switch: Optional[int]) -> bool:
    """Whether batches padded to the two lengths use the same rope factors.

    Args:
        length, other_length: the two padded lengths.
        switch: `longrope_switch`, or None (then always True).
    """
    return switch is None or (length > switch) == (other_length > switch)


def check_rope_regime(length: int, train_length: int, switch: Optional[int], multiple: int) -> None:
    """Refuse a padded length on the other side of the switch from training's.

    Args:
        length: the padded length of a forward-only pass.
        train_length: the length training pads to.
        switch: `longrope_switch`, or None.
        multiple: the pad multiple, for the message.

    Raises:
        ValueError: the two lengths are on opposite sides of the switch.
    """
    if not same_rope_regime(length, train_length, switch):
        raise ValueError(
            f"padding to a multiple of {multiple} makes {length} positions, past the longrope "
            f"switch at {switch}, while training pads to the shards' {train_length}: routing "
            "would be measured under other rope factors than training uses. Shard with a "
            "seq_length past the switch, or use a pad multiple (and TP size) that divides it"
        )
