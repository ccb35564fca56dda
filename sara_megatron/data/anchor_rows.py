"""The anchor-language token rows of training samples, looked up by sample id (online priors,
ShifCon).

A target-language sample and its anchor translation share a sample id; `AnchorRows(shards)`
returns the anchor's tokens for an id, so each micro-batch can carry its samples' anchor rows and
the trainer can take the anchor priors (`sara.priors: online`) or the anchor representations
(`sara.objective: shifcon`) from a forward of the model being trained (docs/objectives.md).

Unpacked, a micro-batch's anchor rows are its rows' anchors, one per row. Packed
(`pack_anchor_rows`, docs/packing.md), the anchors of a micro-batch's samples are packed by the
same rule as training rows (first-fit decreasing into rows of seq_length), on their own lengths:
they may need more or fewer rows than the training samples did. Their segment ids are the
training samples' (anchor segment k is the anchor of training sample k), so the anchor forward's
per-segment statistics line up with the training batch's samples.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from sara_megatron.data.packing import PackedRows, first_fit_decreasing, pack_rows_tokens
from sara_megatron.data.token_shards import TokenShards


class AnchorRows:
    """The anchor-language token rows of a corpus, by sample id: calling it with a sample id
    gives that sample's anchor token ids ([n]).

    Args:
        shards: The token shards (their anchor language is read).
    """

    def __init__(self, shards: TokenShards):
        self.shards = shards
        self._index = {s.meta.sample_id: s for s in shards.samples(shards.anchor_language)}

    def check_covers(self, sample_ids: Iterable[str]) -> None:
        """Refuse training samples without an anchor row.

        Args:
            sample_ids: The training samples.

        Raises:
            ValueError: Naming how many lack one, and the first five.
        """
        missing = [i for i in dict.fromkeys(sample_ids) if i not in self._index]
        if missing:
            raise ValueError(
                f"{len(missing)} training sample id(s) have no {self.shards.anchor_language!r} "
                f"anchor row in {self.shards.root}, e.g. {missing[:5]}: online priors and "
                "ShifCon need the anchor of every training sample")

    def __call__(self, sample_id: str) -> np.ndarray:
        return self.shards.tokens(self._index[sample_id])


def anchor_rows_for(shards: TokenShards, sample_ids: Iterable[str]) -> AnchorRows:
    """The anchor rows of a corpus, checked to cover every training sample.

    Args:
        shards: The token shards.
        sample_ids: The training samples.

    Raises:
        ValueError: As `AnchorRows.check_covers`.
    """
    rows = AnchorRows(shards)
    rows.check_covers(sample_ids)
    return rows


def pack_anchor_rows(anchors: Sequence[np.ndarray], seq_length: int, pad_id: int = 0
                     ) -> PackedRows:
    """The anchors of one packed micro-batch's samples (in its segment order) packed into rows
    of `seq_length` by first-fit decreasing, with segment ids renumbered so that segment k is
    `anchors[k]` (pack_rows_tokens numbers them row by row). No loss mask: the anchor forward
    trains nothing.

    Args:
        anchors: The anchors' token ids ([n_k] each), in the micro-batch's segment order.
        seq_length: S, a row's tokens.
        pad_id: The padding id.

    Returns:
        The `PackedRows` ([R_a, S]).
    """
    rows = first_fit_decreasing([len(a) for a in anchors], seq_length)
    packed = pack_rows_tokens([[anchors[i] for i in row] for row in rows],
                              [[0] * len(row) for row in rows], seq_length, pad_id)
    sample_of_segment = torch.tensor([i for row in rows for i in row] + [-1], dtype=torch.int64)
    packed.segment_ids = sample_of_segment[packed.segment_ids]  # -1 indexes the trailing -1
    return packed
