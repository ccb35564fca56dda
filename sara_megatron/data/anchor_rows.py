"""The anchor-language token rows of training samples, looked up by sample id (online priors).

A target-language sample and its anchor translation share a sample id; `AnchorRows(shards)`
returns the anchor's tokens for an id, so each micro-batch can carry its samples' anchor rows and
the trainer can take the anchor priors from a forward of the model being trained
(`sara.priors: online`, see docs/objectives.md)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from sara_megatron.data.token_shards import TokenShards


class AnchorRows:
    def __init__(self, shards: TokenShards):
        self.shards = shards
        self._index = {s.meta.sample_id: s for s in shards.samples(shards.anchor_language)}

    def check_covers(self, sample_ids: Iterable[str]) -> None:
        missing = [i for i in dict.fromkeys(sample_ids) if i not in self._index]
        if missing:
            raise ValueError(
                f"{len(missing)} training sample id(s) have no {self.shards.anchor_language!r} "
                f"anchor row in {self.shards.root}, e.g. {missing[:5]}: online priors need the "
                "anchor of every training sample")

    def __call__(self, sample_id: str) -> np.ndarray:
        return self.shards.tokens(self._index[sample_id])
