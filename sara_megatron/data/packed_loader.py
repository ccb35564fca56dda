"""The packed form of the SARA data loader (`SaraDataConfig.packing`): per step, this rank's
micro-batches of the packed global batch (`data/packing.py` has the rule).

The batch sampler plans each step's packing from the samples' token counts (the shards'
metadata, no token read) and yields one key list per micro-batch; the collator lays the rows out
and carries, beside the usual fields, `position_ids`, `segment_ids` and the number of
micro-batches of the step (`step_micro_batches`), which may change from step to step.

With anchor rows (online priors, ShifCon) the collator also packs the anchors of the
micro-batch's samples by the same rule (`data/anchor_rows.pack_anchor_rows`): `anchor_tokens`,
`anchor_padding_mask`, `anchor_position_ids` and `anchor_segment_ids`, whose segment k is the
anchor of the micro-batch's sample k. Their number of rows is the anchors' own, not
`micro_batch_size`; the anchor forward pads a step's anchor micro-batches to a common count.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch

from sara_megatron.data.anchor_rows import anchor_rows_for, pack_anchor_rows
from sara_megatron.data.packing import pack_rows_tokens, plan_packed_step
from sara_megatron.data.sample_order import GlobalSampleOrder, check_dp_rank
from sara_megatron.data.sara_dataset import SaraDataLoader, SaraMicroBatch


class PackedKey(NamedTuple):
    """What the packed sampler hands the dataset for one sample (see the field comments)."""

    index: int  # dataset index of the sample
    row: int  # row of the micro-batch it sits in
    step_micro_batches: int  # micro-batches of this rank in the step


class PackedStepSampler:
    """Batch sampler of one data-parallel rank: each step takes the next `global_batch_size`
    positions of the global sample order (as the padded run's step does) and yields the rank's
    micro-batches of their packing. `consumed_samples` resumes at a step boundary.

    Args:
        order: The global sample order (epochs, shuffle).
        total_samples: Samples of the whole run (epochs x dataset).
        lengths: Tokens of each dataset sample.
        seq_length: A row's tokens.
        global_batch_size: Samples a step, a multiple of micro_batch_size x dp_size.
        micro_batch_size: Rows a micro-batch.
        dp_rank, dp_size: This data-parallel rank and the number of ranks.
        consumed_samples: Samples of the run already taken, a multiple of global_batch_size.

    Raises:
        ValueError: The batch sizes or consumed_samples do not divide as stated, or a bad rank.
    """

    def __init__(self, order: GlobalSampleOrder, total_samples: int, lengths: Sequence[int],
                 seq_length: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, consumed_samples: int = 0):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global batch {global_batch_size} is not a multiple of micro batch "
                             f"× data parallel = {micro_batch_size} × {dp_size}")
        if consumed_samples % global_batch_size:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of the "
                             f"global batch {global_batch_size}: packed steps start there")
        check_dp_rank(dp_rank, dp_size)
        self.order = order
        self.total_samples = total_samples
        self.lengths = lengths
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def steps(self) -> int:
        """The whole steps left from `consumed_samples` on."""
        return max(0, (self.total_samples - self.consumed_samples) // self.global_batch_size)

    def step_plan(self, position: int):
        """The packing of one step.

        Args:
            position: The step's first position in the global sample order.

        Returns:
            (the step's dataset indices, its `packing.PackedStepPlan`).
        """
        indices = [self.order[p] for p in range(position, position + self.global_batch_size)]
        plan = plan_packed_step([self.lengths[i] for i in indices], self.seq_length,
                                self.micro_batch_size, self.dp_size)
        return indices, plan

    def __iter__(self) -> Iterator[list[PackedKey]]:
        position = self.consumed_samples
        while position + self.global_batch_size <= self.total_samples:
            indices, plan = self.step_plan(position)
            mine = plan.rank_micro_batches(self.dp_rank)
            for micro_batch in mine:
                yield [PackedKey(indices[s], slot, len(mine))
                       for slot, row in enumerate(micro_batch) if row >= 0
                       for s in plan.rows[row]]
            position += self.global_batch_size


class PackedSamples(torch.utils.data.Dataset):
    """`SaraTrainingSamples` indexed by `PackedKey`: item -> (key, the sample's item). The
    wrapped dataset's `shards`, `languages` and `samples` read through.

    Args:
        training_samples: The `SaraTrainingSamples`, priors attached.
    """

    def __init__(self, training_samples):
        self.training_samples = training_samples
        self.shards = training_samples.shards
        self.languages = training_samples.languages
        self.samples = training_samples.samples

    def __len__(self) -> int:
        return len(self.training_samples)

    def __getitem__(self, key: PackedKey):
        return key, self.training_samples[key.index]


class PackedBatchCollator:
    """collate_fn of the packed loader: [micro_batch_size, seq_length] rows of whole samples.

    Args:
        seq_length: S, a row's tokens.
        rows_per_micro_batch: R, rows a micro-batch.
        pad_id: The padding id.
        store: The prior store read per batch, or None.
        prior_layers: The global layers of the priors' rows.
        prior_table_digest: The digest of the prior table the rows index, or None.
        anchor_rows: `anchor_rows.AnchorRows` (sample id -> its anchor's tokens), or None.

    Raises:
        ValueError: Both a store and a table digest.
    """

    def __init__(self, seq_length: int, rows_per_micro_batch: int, pad_id: int, store,
                 prior_layers: Sequence[int], prior_table_digest: Optional[str] = None,
                 anchor_rows=None):
        if store is not None and prior_table_digest is not None:
            raise ValueError("priors come either from a prior table or from the store")
        self.seq_length = seq_length
        self.rows_per_micro_batch = rows_per_micro_batch
        self.pad_id = pad_id
        self.store = store
        self.prior_layers = tuple(int(i) for i in prior_layers)
        self.prior_table_digest = prior_table_digest
        self.anchor_rows = anchor_rows  # data.anchor_rows.AnchorRows, or None

    def __call__(self, items):
        rows = [[] for _ in range(self.rows_per_micro_batch)]
        for key, item in items:
            rows[key.row].append(item)
        flat = [item for row in rows for item in row]  # segment order
        packed = pack_rows_tokens([[tokens for _, tokens, _ in row] for row in rows],
                                  [[s.meta.prompt_length for s, _, _ in row] for row in rows],
                                  self.seq_length, self.pad_id)
        priors = prior_rows = None
        if self.prior_table_digest is not None:
            prior_rows = torch.from_numpy(np.array([row for _, _, row in flat], np.int64))
        elif self.store is not None:
            priors = self.store.stack([prior for _, _, prior in flat])
        metas = [sample.meta for sample, _, _ in flat]
        anchors = {}
        if self.anchor_rows is not None:
            rows = pack_anchor_rows([self.anchor_rows(m.sample_id) for m in metas],
                                    self.seq_length, self.pad_id)
            anchors = dict(anchor_tokens=rows.tokens, anchor_padding_mask=rows.padding_mask,
                           anchor_position_ids=rows.position_ids,
                           anchor_segment_ids=rows.segment_ids)
        return SaraMicroBatch(
            packed.tokens, packed.labels, packed.loss_mask, packed.padding_mask,
            [m.sample_id for m in metas], [m.language for m in metas], priors, self.prior_layers,
            prior_rows, self.prior_table_digest,
            position_ids=packed.position_ids, segment_ids=packed.segment_ids,
            step_micro_batches=items[0][0].step_micro_batches, **anchors,
        )


def packed_fill_rate(sampler: PackedStepSampler, steps: int) -> tuple[float, float]:
    """The fill rate (real tokens over computed tokens) of the next steps, packed and padded
    (the plan only; no token is read).

    Args:
        sampler: The packed sampler.
        steps: Steps to plan (at most those left).

    Returns:
        (packed fill rate, padded fill rate).
    """
    real = packed_rows = padded_rows = 0
    position = sampler.consumed_samples
    for _ in range(min(steps, sampler.steps())):
        indices, plan = sampler.step_plan(position)
        real += sum(min(sampler.lengths[i], sampler.seq_length) for i in indices)
        packed_rows += len(plan.micro_batches) * sampler.micro_batch_size
        padded_rows += len(indices)
        position += sampler.global_batch_size
    s = sampler.seq_length
    return real / max(packed_rows * s, 1), real / max(padded_rows * s, 1)


def packed_layout(config, dataset, order: GlobalSampleOrder, global_batch_size: Optional[int],
                  dp_rank: int, dp_size: int, consumed_samples: int, seq_length: int, store,
                  prior_layers, table):
    """The parts of the packed loader.

    Args:
        config: The `SaraDataConfig`.
        dataset: The training samples, priors attached.
        order: The global sample order.
        global_batch_size: Samples a step (required).
        dp_rank, dp_size: This data-parallel rank and the number of ranks.
        consumed_samples: Samples of the run already taken.
        seq_length: A row's tokens.
        store: The prior store read per batch, or None.
        prior_layers: The global layers of the priors' rows.
        table: The prior table the batches index, or None.

    Returns:
        (batch sampler, dataset, collate_fn).

    Raises:
        ValueError: No global_batch_size.
    """
    if global_batch_size is None:
        raise ValueError("data packing plans whole global batches: pass global_batch_size")
    anchor_rows = None
    if config.anchor_rows:
        anchor_rows = anchor_rows_for(dataset.shards,
                                      (s.meta.sample_id for s in dataset.samples))
    sampler = PackedStepSampler(order, config.epochs * len(dataset),
                                [s.meta.token_count for s in dataset.samples], seq_length,
                                global_batch_size, config.micro_batch_size, dp_rank, dp_size,
                                consumed_samples)
    collate = PackedBatchCollator(seq_length, config.micro_batch_size, config.pad_id, store,
                                  prior_layers, table.digest if table is not None else None,
                                  anchor_rows)
    return sampler, PackedSamples(dataset), collate


def build_packed_batch_loader(config, shards, dataset, store=None, prior_layers: Sequence[int] = (),
                              table=None, dp_rank: int = 0, dp_size: int = 1,
                              consumed_samples: int = 0, num_workers: int = 0,
                              pin_memory: bool = False,
                              global_batch_size: Optional[int] = None) -> SaraDataLoader:
    """`sara_dataset.build_batch_loader` for `config.packing`: the packed micro-batches of each
    global batch of `global_batch_size` samples.

    Args:
        config: The `SaraDataConfig` (with `packing`).
        shards: The token shards.
        dataset: The training samples, priors attached.
        store: The prior store read per batch, or None.
        prior_layers: The global layers of the priors' rows.
        table: The prior table the batches index, or None.
        dp_rank, dp_size: This data-parallel rank and the number of ranks.
        consumed_samples: Samples of the run already taken.
        num_workers: DataLoader worker processes.
        pin_memory: Pin the batches' memory.
        global_batch_size: Samples a step (required).

    Returns:
        The `SaraDataLoader` of packed micro-batches.
    """
    order = GlobalSampleOrder(len(dataset), config.seed, config.shuffle)
    sampler, packed_dataset, collate = packed_layout(
        config, dataset, order, global_batch_size, dp_rank, dp_size, consumed_samples,
        config.seq_length or shards.seq_length, store, prior_layers, table)
    return SaraDataLoader(packed_dataset, batch_sampler=sampler, collate_fn=collate,
                          num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=num_workers > 0, prior_table=table)
