"""Mock SARA micro-batches for benchmarks and smoke runs (`data.mock: true`), in the spirit of
Megatron-LM's mock GPT dataset: no corpus, no shards, no prior store.

Every row is a full-length sequence of uniformly random token ids (no padding), the first quarter
prompt and the rest response, with an anchor prior per aligned layer drawn from a flat Dirichlet.
Batch i of data-parallel rank r is a pure function of (seed, i, r), so a resumed run sees what an
uninterrupted one would. The model learns nothing from this; it costs exactly what real batches of
the same shape cost, which is what a step-time measurement needs.

`MockSampleLoader` is the same with samples of real lengths (drawn from a list of measured
(prompt, total) token counts) instead of full rows, one per padded row or packed several to a row
by the trainer's packing rule (`data.packing`): what a packed-vs-padded throughput figure needs.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from sara_megatron.data.batch import pack_tokens
from sara_megatron.data.packing import fill_rate, pack_rows_tokens, plan_packed_step
from sara_megatron.data.sample_order import check_rank_position
from sara_megatron.data.sara_dataset import SaraMicroBatch


class MockSaraLoader:
    """Iterable of `SaraMicroBatch` like `SaraDataLoader` (its `prior_table` is None: the priors
    ride in the batches).

    Args:
        vocab_size: Token ids are drawn from [0, vocab_size).
        num_experts: The priors' last dimension.
        prior_layers: The aligned layers (one prior row each); empty for no priors.
        seq_length: The rows' length (>= 2).
        micro_batch_size: Rows a micro-batch.
        dp_rank, dp_size: This data-parallel rank and the number of ranks.
        consumed_samples: Samples of the run already taken (a resume starts after them).
        seed: The random stream (with the batch index and the rank).

    Raises:
        ValueError: seq_length < 2, or as `sample_order.check_rank_position`.
    """

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
        """One micro-batch of this rank: random tokens, a quarter of each row prompt, flat
        Dirichlet priors [L_sel, B, N].

        Args:
            index: The batch's number (the same index gives the same batch).

        Returns:
            The `SaraMicroBatch`.
        """
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


class MockSampleLoader:
    """Iterable of `SaraMicroBatch` of mock samples with real lengths, one step's micro-batches
    after another, padded (one sample per row) or packed (`data/packing.py`'s rule: first-fit
    decreasing rows, `micro_batch_size` rows per micro-batch). Every micro-batch names its step's
    number of micro-batches (`step_micro_batches`), so the trainer takes a whole step either way.
    Step i is a pure function of (seed, i); one data-parallel rank (a single-GPU benchmark).

    Args:
        vocab_size: token ids are drawn from [1, vocab_size).
        num_experts: the priors' last dimension.
        prior_layers: the aligned layers (one prior row each); empty for no priors.
        lengths: (prompt tokens, total tokens) of the samples to draw from, e.g. measured
            interactions; each sample draws one entry.
        seq_length: the rows' length; a longer sample is cut to it.
        micro_batch_size: rows per micro-batch.
        global_batch_size: samples per step.
        packed: pack several samples to a row (else one sample per row).
        length_scale: multiplies every drawn length (longer solutions than the measured ones).
        seed: the random stream.
    """

    prior_table = None

    def __init__(
        self,
        *,
        vocab_size: int,
        num_experts: int,
        prior_layers: Sequence[int],
        lengths: Sequence[tuple[int, int]],
        seq_length: int,
        micro_batch_size: int,
        global_batch_size: int,
        packed: bool,
        length_scale: float = 1.0,
        seed: int = 1234,
    ):
        if not lengths:
            raise ValueError("mock samples need at least one (prompt, total) length")
        if seq_length < 2 or micro_batch_size < 1 or global_batch_size < 1 or length_scale <= 0:
            raise ValueError("seq_length must be >= 2, the batch sizes >= 1 and length_scale > 0")
        if not packed and global_batch_size % micro_batch_size:
            raise ValueError(f"padded: global_batch_size {global_batch_size} must be a multiple "
                             f"of micro_batch_size {micro_batch_size}")
        self.vocab_size = vocab_size
        self.num_experts = num_experts
        self.prior_layers = tuple(int(layer) for layer in prior_layers)
        self.lengths = [(int(p), int(n)) for p, n in lengths]
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.packed = packed
        self.length_scale = float(length_scale)
        self.seed = seed

    def step_samples(self, index: int) -> tuple[list[np.ndarray], list[int], Optional[torch.Tensor]]:
        """A step's samples.

        Args:
            index: The step's number.

        Returns:
            (token arrays, prompt lengths, priors [L_sel, G, N] or None).
        """
        rng = np.random.default_rng([self.seed, index])
        picks = rng.integers(0, len(self.lengths), size=self.global_batch_size)
        prompts, totals = [], []
        for i in picks:
            prompt, total = self.lengths[i]
            prompt = max(1, int(prompt * self.length_scale))
            prompts.append(prompt)
            totals.append(min(self.seq_length, max(prompt + 1, int(total * self.length_scale))))
        seqs = [rng.integers(1, self.vocab_size, size=n, dtype=np.int64) for n in totals]
        priors = None
        if self.prior_layers:
            draws = rng.exponential(size=(len(self.prior_layers), len(seqs), self.num_experts))
            priors = torch.from_numpy((draws / draws.sum(-1, keepdims=True)).astype(np.float32))
        return seqs, prompts, priors

    def step(self, index: int) -> list[SaraMicroBatch]:
        """A step's micro-batches.

        Args:
            index: The step's number.

        Returns:
            The `SaraMicroBatch`es, packed or padded as configured.
        """
        seqs, prompts, priors = self.step_samples(index)
        s, b = self.seq_length, self.micro_batch_size
        out = []
        if not self.packed:
            count = len(seqs) // b
            for k in range(count):
                part = slice(k * b, (k + 1) * b)
                rows = pack_tokens(seqs[part], prompts[part], seq_length=s)
                out.append(self._micro_batch(rows, index, list(range(k * b, (k + 1) * b)),
                                             priors, count))
            return out
        plan = plan_packed_step([len(x) for x in seqs], s, b, 1)
        micro_batches = plan.rank_micro_batches(0)
        for mb in micro_batches:
            rows = [plan.rows[r] if r >= 0 else () for r in mb]
            packed = pack_rows_tokens([[seqs[i] for i in row] for row in rows],
                                      [[prompts[i] for i in row] for row in rows], s)
            order = [i for row in rows for i in row]
            out.append(self._micro_batch(packed, index, order, priors, len(micro_batches)))
        return out

    def fill_rate(self, index: int) -> float:
        """The share of real tokens in a step's computed tokens (packed or padded, as
        configured).

        Args:
            index: The step's number.

        Returns:
            Real tokens over computed tokens.
        """
        seqs, _, _ = self.step_samples(index)
        lengths = [len(x) for x in seqs]
        if not self.packed:
            return fill_rate(lengths, len(seqs), self.seq_length)
        plan = plan_packed_step(lengths, self.seq_length, self.micro_batch_size, 1)
        return fill_rate(lengths, len(plan.micro_batches) * self.micro_batch_size,
                         self.seq_length)

    def _micro_batch(self, rows, index: int, samples: list[int], priors, count: int
                     ) -> SaraMicroBatch:
        ids = [f"mock-{index}-{i}" for i in samples]
        packed = self.packed
        return SaraMicroBatch(
            rows.tokens, rows.labels, rows.loss_mask, rows.padding_mask, ids,
            ["mock"] * len(samples), priors[:, samples] if priors is not None else None,
            self.prior_layers,
            position_ids=rows.position_ids if packed else None,
            segment_ids=rows.segment_ids if packed else None,
            step_micro_batches=count,
        )

    def __iter__(self) -> Iterator[SaraMicroBatch]:
        index = 0
        while True:
            yield from self.step(index)
            index += 1
