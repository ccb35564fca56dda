"""Sequence packing: the samples of one global batch in as few rows of `seq_length` as they fit.

The rule (`plan_packed_step`), for the G samples a step takes (the same G stream positions the
padded run's step takes, `sample_order.GlobalSampleOrder`):

1. Rows: first-fit decreasing over the samples' token counts (longest first, ties in stream
   order), into rows of `seq_length` tokens. A sample is never split; one longer than a row is cut
   to `seq_length` exactly as the padded path cuts it and fills a row alone. Within a row the
   samples keep stream order.
2. Micro-batches: K = dp · ceil(rows / (micro_batch_size · dp)) micro-batches of
   `micro_batch_size` rows each. Row k goes to micro-batch k mod K (round robin, so every
   micro-batch gets a real row); unused slots are all-padding rows. Megatron's load-balancing
   loss divides by a micro-batch's real tokens, so a micro-batch without any is not allowed: with
   fewer rows than K, the fullest rows give up their last sample to new rows until there are K.
3. Ranks: micro-batch g goes to data-parallel rank g mod dp as its (g div dp)-th micro-batch,
   the order of the padded sampler.

Everything depends only on the step's samples (and dp through K), never on the rank: every rank
computes the same plan and keeps its own micro-batches, so the number of micro-batches per step
(which may vary from step to step) agrees over data, tensor, pipeline and expert parallel. The
global batch is still counted in samples, so consumed_samples, resume and the CE / JS
normalisation mean what they mean unpacked.

`pack_rows_tokens` lays out one micro-batch: per row tokens, next-token labels within each sample
(never across a sample boundary), the loss mask over each sample's response tokens, positions
restarting at 0 for each sample, and segment ids numbering the micro-batch's samples (-1 =
padding), the ids the routing capture, the SARA loss and the fused JS kernel take.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class PackedStepPlan:
    """One global batch's packing. Samples are named by their position 0..G-1 in the step."""

    rows: tuple[tuple[int, ...], ...]  # the samples of each row, in stream order
    micro_batches: tuple[tuple[int, ...], ...]  # K micro-batches: row indices (-1 = empty row)
    dp_size: int

    def rank_micro_batches(self, dp_rank: int) -> list[tuple[int, ...]]:
        """A data-parallel rank's micro-batches.

        Args:
            dp_rank: The rank, in 0..dp_size-1.

        Returns:
            Its micro-batches (row indices, -1 = empty row), in schedule order.

        Raises:
            ValueError: A rank outside the range.
        """
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{self.dp_size - 1}")
        return list(self.micro_batches[dp_rank::self.dp_size])

    @property
    def micro_batches_per_rank(self) -> int:
        """Micro-batches each rank takes in this step (the same on every rank)."""
        return len(self.micro_batches) // self.dp_size


def first_fit_decreasing(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Bin-pack samples into rows: longest first into the first row with room.

    Args:
        lengths: Tokens of each sample (above `seq_length` counts as `seq_length`: it is cut).
        seq_length: A row's tokens (>= 1).

    Returns:
        Rows of sample indices, each row in index order.

    Raises:
        ValueError: seq_length < 1.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    sizes = [min(max(int(n), 0), seq_length) for n in lengths]
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if sizes[i] <= free:
                rows[r].append(i)
                room[r] -= sizes[i]
                break
        else:
            rows.append([i])
            room.append(seq_length - sizes[i])
    return [sorted(row) for row in rows]


def spread_rows(rows: list[list[int]], min_rows: int) -> list[list[int]]:
    """Move samples out of the fullest rows (most samples first, then lowest index) into new rows
    until there are `min_rows`.

    Args:
        rows: Rows of sample indices.
        min_rows: Rows wanted.

    Returns:
        The new rows (the input is not changed).

    Raises:
        ValueError: Fewer samples than `min_rows`.
    """
    rows = [list(row) for row in rows]
    if sum(len(row) for row in rows) < min_rows:
        raise ValueError(f"{sum(len(r) for r in rows)} samples cannot fill {min_rows} rows")
    while len(rows) < min_rows:
        donor = max(range(len(rows)), key=lambda r: (len(rows[r]), -r))
        rows.append([rows[donor].pop()])
    return rows


def plan_packed_step(lengths: Sequence[int], seq_length: int, micro_batch_size: int,
                     dp_size: int) -> PackedStepPlan:
    """The packing of one global batch (see the module docstring).

    Args:
        lengths: Tokens of each sample of the step, in stream order.
        seq_length: A row's tokens.
        micro_batch_size: Rows a micro-batch.
        dp_size: Data-parallel ranks (each gets as many micro-batches).

    Returns:
        The `PackedStepPlan`.

    Raises:
        ValueError: Sizes below 1, or fewer samples than ranks.
    """
    if micro_batch_size < 1 or dp_size < 1:
        raise ValueError(f"micro_batch_size and dp_size must be >= 1, got {micro_batch_size}, "
                         f"{dp_size}")
    if len(lengths) < dp_size:
        raise ValueError(f"a global batch of {len(lengths)} samples cannot give each of "
                         f"{dp_size} data-parallel ranks a micro-batch")
    rows = first_fit_decreasing(lengths, seq_length)
    per_round = micro_batch_size * dp_size
    k = dp_size * -(-len(rows) // per_round)
    if len(rows) < k:
        rows = spread_rows(rows, k)
    micro_batches = tuple(
        tuple(g + j * k if g + j * k < len(rows) else -1 for j in range(micro_batch_size))
        for g in range(k)
    )
    return PackedStepPlan(tuple(tuple(r) for r in rows), micro_batches, dp_size)


def fill_rate(lengths: Sequence[int], rows: int, seq_length: int) -> float:
    """The share of real tokens in packed rows.

    Args:
        lengths: Tokens of each sample (cut samples count cut).
        rows: Rows used.
        seq_length: A row's tokens.

    Returns:
        Real tokens over rows * seq_length.
    """
    real = sum(min(int(n), seq_length) for n in lengths)
    return real / max(rows * seq_length, 1)


@dataclasses.dataclass
class PackedRows:
    """Packed rows of samples, ready for the forward (shapes in the field comments)."""

    tokens: torch.Tensor  # [R, S] int64, padding = pad_id
    labels: torch.Tensor  # [R, S] int64: the next token of the same sample, else pad_id
    loss_mask: torch.Tensor  # [R, S] float32: 1 where the label is a response token
    padding_mask: torch.Tensor  # [R, S] bool, True = padding
    position_ids: torch.Tensor  # [R, S] int64, 0 at each sample's first token (0 on padding)
    segment_ids: torch.Tensor  # [R, S] int64, the sample's index in the flat list, -1 = padding


def pack_rows_tokens(rows: Sequence[Sequence[np.ndarray]], prompt_lengths: Sequence[Sequence[int]],
                     seq_length: int, pad_id: int = 0) -> PackedRows:
    """Lay out rows of samples (token arrays, each row's in order) in [R, seq_length]. Segment
    ids number the samples row by row: row 0's first sample is 0, and so on. A sample longer
    than `seq_length` is cut to it; a row whose samples do not fit is refused.

    Args:
        rows: Per row, its samples' token ids ([n_i] each), in order.
        prompt_lengths: Per row, each sample's tokens before its response.
        seq_length: S, a row's tokens.
        pad_id: The padding id.

    Returns:
        The `PackedRows` ([R, S]).

    Raises:
        ValueError: A row whose samples do not fit.
    """
    r = len(rows)
    tokens = np.full((r, seq_length), pad_id, dtype=np.int64)
    labels = np.full((r, seq_length), pad_id, dtype=np.int64)
    loss_mask = np.zeros((r, seq_length), dtype=np.float32)
    positions = np.zeros((r, seq_length), dtype=np.int64)
    segments = np.full((r, seq_length), -1, dtype=np.int64)
    segment = 0
    for i, (row, prompts) in enumerate(zip(rows, prompt_lengths)):
        offset = 0
        for seq, prompt in zip(row, prompts):
            n = min(len(seq), seq_length)
            if offset + n > seq_length:
                raise ValueError(f"row {i} holds more than seq_length={seq_length} tokens")
            end = offset + n
            tokens[i, offset:end] = seq[:n]
            labels[i, offset:end - 1] = seq[1:n]
            t = np.arange(n)
            loss_mask[i, offset:end] = (t < n - 1) & (t + 1 >= prompt)
            positions[i, offset:end] = t
            segments[i, offset:end] = segment
            segment += 1
            offset = end
    return PackedRows(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask),
        padding_mask=torch.from_numpy(segments < 0),
        position_ids=torch.from_numpy(positions),
        segment_ids=torch.from_numpy(segments),
    )
