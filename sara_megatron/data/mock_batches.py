"""Mock SARA micro-batches for benchmarks and smoke runs (`data.mock: true`), in the spirit of
Megatron-LM's mock GPT dataset: no corpus, no shards, no prior store.

Every row is a full-length sequence of uniformly random token ids (no padding), the first quarter
prompt and the rest response, with an anchor prior per aligned layer drawn from a flat Dirichlet.
Batch i of data-parallel rank r is a pure function of (seed, i, r), so a resumed run sees what an
uninterrupted one would. The model learns nothing from this; it costs exactly what real batches of
the same shape cost, which is what a step-time measurement needs.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from sara_megatron.data.batch import pack_tokens
from sara_megatron.data.sample_order import check_rank_position
from sara_megatron.data.sara_dataset import SaraMicroBatch


class MockSaraLoader:
    """Iterable of `SaraMicroBatch` like `SaraDataLoader` (its `prior_table` is None: the priors
    ride in the batches)."""

    prior_table = None

    def __init__(
        self,
        *,
        vocab_size: int,
        num_experts: int,
        prior_layers: Sequence[int],
        seq_length: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        seed: int = 1234,
    ):
        if seq_length < 2:
            raise ValueError(f"mock batches need seq_length >= 2, got {seq_length}")
        per_step = check_rank_position(micro_batch_size, dp_rank, dp_size, consumed_samples)
        self.vocab_size = vocab_size
        self.num_experts = num_experts
        self.prior_layers = tuple(int(layer) for layer in prior_layers)
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.first_batch = consumed_samples // per_step
        self.seed = seed

    def batch(self, index: int) -> SaraMicroBatch:
        rng = np.random.default_rng([self.seed, index, self.dp_rank])
        b, s = self.micro_batch_size, self.seq_length
        rows = rng.integers(0, self.vocab_size, size=(b, s), dtype=np.int64)
        packed = pack_tokens(list(rows), [s // 4] * b, seq_length=s)
        priors = None
        if self.prior_layers:
            # Normalised unit exponentials are a flat Dirichlet; fp32 rows summing to 1.
            draws = rng.exponential(size=(len(self.prior_layers), b, self.num_experts))
            priors = torch.from_numpy((draws / draws.sum(-1, keepdims=True)).astype(np.float32))
        ids = [f"mock-{self.dp_rank}-{index}-{row}" for row in range(b)]
        return SaraMicroBatch(packed.tokens, packed.labels, packed.loss_mask, packed.padding_mask,
                              ids, ["mock"] * b, priors, self.prior_layers)

    def __iter__(self) -> Iterator[SaraMicroBatch]:
        index = self.first_batch
        while True:
            yield self.batch(index)
            index += 1
