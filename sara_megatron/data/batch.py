"""Pack token sequences into a right-padded micro-batch with labels and masks.

Every token of a sequence is fed to the model — prompt and response, the last one included — so
the routing profile seen in training covers the same tokens as the anchor prior extracted from
the same packing. Next-token labels: labels[t] = tokens[t + 1]; the loss mask is 1 where that next
token is a response token (t + 1 >= prompt_length), 0 at the last token and on padding.
Masks follow Megatron: padding_mask True = padding.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch


@dataclasses.dataclass
class PackedTokens:
    """Right-padded token rows of a batch (shapes in the field comments)."""

    tokens: torch.Tensor  # [B, S] int64, padding = pad_id
    labels: torch.Tensor  # [B, S] int64, pad_id where there is no next token
    loss_mask: torch.Tensor  # [B, S] float32, 1 = predict a response token
    padding_mask: torch.Tensor  # [B, S] bool, True = padding
    lengths: torch.Tensor  # [B] int64 tokens per row


def padded_length(lengths: Sequence[int], seq_length: Optional[int], multiple_of: int = 1) -> int:
    """The batch's S: `seq_length` if given, else the longest row rounded up to `multiple_of`.

    Args:
        lengths: Tokens of each row.
        seq_length: A fixed length, or None.
        multiple_of: What S is rounded up to (e.g. the TP or CP degree's multiple).
    """
    if seq_length is not None:
        return seq_length
    longest = max(lengths, default=1)
    return -(-max(longest, 1) // multiple_of) * multiple_of


def pack_tokens(
    sequences: Sequence[np.ndarray],
    prompt_lengths: Sequence[int],
    seq_length: Optional[int] = None,
    multiple_of: int = 1,
    pad_id: int = 0,
) -> PackedTokens:
    """Right-pad sequences to a common length; longer ones are cut at `seq_length`.

    Args:
        sequences: Token ids of each sample, [n_i] each.
        prompt_lengths: Tokens before each sample's response (not predicted).
        seq_length: A fixed S, or None (`padded_length`).
        multiple_of: What S is rounded up to.
        pad_id: The padding id.

    Returns:
        The `PackedTokens` ([B, S] rows).
    """
    lengths = [min(len(s), seq_length) if seq_length else len(s) for s in sequences]
    s = padded_length(lengths, seq_length, multiple_of)
    b = len(sequences)
    tokens = np.full((b, s), pad_id, dtype=np.int64)
    for i, (seq, n) in enumerate(zip(sequences, lengths)):
        tokens[i, :n] = seq[:n]
    positions = np.arange(s)
    n = np.asarray(lengths, dtype=np.int64)[:, None]
    prompt = np.asarray(prompt_lengths, dtype=np.int64)[:, None]
    padding = positions[None, :] >= n
    has_next = positions[None, :] < n - 1
    labels = np.where(has_next, np.roll(tokens, -1, axis=1), pad_id)
    loss_mask = has_next & (positions[None, :] + 1 >= prompt)
    return PackedTokens(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask.astype(np.float32)),
        padding_mask=torch.from_numpy(padding),
        lengths=torch.from_numpy(n[:, 0].copy()),
    )
