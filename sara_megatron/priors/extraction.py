"""Anchor prior extraction: run the anchor sequences through the Megatron model and store, per
sample and recorded layer, the masked sequence mean of the dense fp32 routing softmax (paper
Eq. 5-6; every non-padding token — prompt and response — counts).

Works at any TP/EP/PP/DP layout through megatron's forward-only schedule and the forward runner
(padding, longrope rule and packing as training's, docs/data-and-priors.md). Data-parallel
replicas take disjoint samples (longest first, dealt round-robin); every step all ranks run the
same number and shape of micro-batches, since expert parallel exchanges tokens across replicas
(a replica out of samples runs all-padding rows). Each pipeline stage captures its own layers,
checked to be owned exactly once. Rank tp=0, pp=0 of each replica writes its samples every
`flush_every` samples; a rerun after a kill skips the samples already on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from sara_megatron.data.packing import first_fit_decreasing
from sara_megatron.data.token_shards import ShardedSample, TokenShards
from sara_megatron.priors.store_writer import PriorStoreWriter
from sara_megatron.routing import capture_routing
from sara_megatron.routing.capture import check_process_groups
from sara_megatron.routing.forward_runner import ForwardRows, ForwardRunner, lay_out_rows


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """How `extract_priors` runs (field meanings in the comments)."""

    layers: tuple[int, ...]  # global 0-based layers to record
    micro_batch_size: int = 1
    num_microbatches: int = 1  # per schedule call; > 1 keeps a pipeline's stages busy
    flush_every: int = 256  # samples per store shard written by each replica
    pad_multiple: int = 8  # padded lengths are multiples of this (and of TP, for SP)
    packing: bool = True  # several samples per row (rows of the shards' seq_length)
    pack_window: int = 2048  # samples packed together (bounds first-fit decreasing's cost)


@dataclasses.dataclass(frozen=True)
class ExtractionProgress:
    """What the progress callback receives after each step (on world rank 0)."""

    samples_done: int  # this run, all replicas
    samples_total: int  # this run's pending samples, all replicas
    already_done: int  # found in the store from an earlier run
    tokens_done: int
    mean_nll: float  # next-token loss of this step's anchors: a loaded-the-right-weights check
    elapsed_s: float
    fill_rate: float = 1.0  # real tokens over the row tokens run so far (all replicas)


def _device() -> torch.device:
    """Where the model runs and collectives reduce: NCCL takes CUDA tensors, gloo CPU ones."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world_max(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _world_sum(values: Sequence[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def _size_and_rank(process_groups: Optional[ProcessGroupCollection], name: str) -> tuple[int, int]:
    """(size, this rank's index) of one of megatron's groups; (1, 0) for one process alone."""
    if process_groups is None:
        return 1, 0
    group = getattr(process_groups, name)
    return dist.get_world_size(group), dist.get_rank(group)


def _deal(pending: list[ShardedSample], dp: int, dp_rank: int) -> list[ShardedSample]:
    order = sorted(range(len(pending)), key=lambda i: (-pending[i].meta.token_count, i))
    return [pending[i] for i in order[dp_rank::dp]]


def _step_rows(rows: list[list[int]], per_step: int) -> list[list[list[int]]]:
    return [rows[i:i + per_step] for i in range(0, len(rows), per_step)]


def _plan_rows(samples: list[ShardedSample], capacity: int, settings: ExtractionSettings
               ) -> list[list[int]]:
    """Rows of indices into `samples`: one sample each, or packed into rows of `capacity`
    tokens (first-fit decreasing per window of `pack_window` samples)."""
    if not settings.packing:
        return [[i] for i in range(len(samples))]
    rows = []
    for start in range(0, len(samples), settings.pack_window):
        window = samples[start:start + settings.pack_window]
        rows += [[start + i for i in row] for row in
                 first_fit_decreasing([s.meta.token_count for s in window], capacity)]
    return rows


def _run_step(runner: ForwardRunner, microbatches: list[ForwardRows], layers: Sequence[int],
              num_segments: int, process_groups: Optional[ProcessGroupCollection]):
    """Forward the micro-batches; returns this stage's {(mb, layer): ([n, N] sequence means,
    [n] token counts)} over the step's n samples (0 for those of other micro-batches) and the
    (NLL sum, token count) of each micro-batch on the last stage."""
    records, nll = {}, []

    def loss(index, rows: ForwardRows, per_token_loss):
        segments = rows.segment_ids.to(per_token_loss.device)
        has_next = torch.zeros_like(segments, dtype=torch.float32)
        has_next[:, :-1] = ((segments[:, :-1] >= 0) & (segments[:, 1:] == segments[:, :-1])).float()
        total = (per_token_loss.float() * has_next).sum()
        nll.append((total.item(), has_next.sum().item()))
        return total

    @contextlib.contextmanager
    def observe(index, inputs, rows):
        with capture_routing(runner.chunks, inputs.segment_ids, layers=layers, keep_probs=False,
                             num_segments=num_segments, process_groups=process_groups) as capture:
            yield
        # Keep the [B, N] means and counts only: the per-token logits would pile up over the
        # step's micro-batches ([T, N] per layer each).
        for layer, record in capture.records.items():
            records[(index, layer)] = (record.seq_mean, record.token_count)

    runner.run(microbatches, observe, loss=loss)
    return records, nll


def extract_priors(
    model,
    shards: TokenShards,
    writer: PriorStoreWriter,
    settings: ExtractionSettings,
    progress: Optional[Callable[[ExtractionProgress], None]] = None,
    process_groups: Optional[ProcessGroupCollection] = None,
) -> dict:
    """Collective over the world: extract the anchor priors of `shards` into `writer`'s store.

    Args:
        model: the built model, or this rank's list of pipeline chunks.
        shards: the token shards; their anchor language's samples are extracted, at most
            `shards.seq_length` tokens each.
        writer: the store writer (prepared on rank 0 here, finalized at the end).
        settings: layers, batch shape, flush interval, padding and packing.
        progress: called on world rank 0 after every step; None: silent.
        process_groups: megatron's groups (`distributed.model_process_groups()`, read once by
            the caller); None is one process alone.

    Returns:
        {"samples_extracted", "samples_resumed" (found from an earlier run), "tokens",
        "fill_rate" (real over row tokens), "elapsed_s", "store" (`writer.finalize`'s result on
        rank 0, None elsewhere)}.

    Raises:
        ValueError: no `process_groups` on several ranks.
        RuntimeError: routing counted other token numbers than the sequences hold, or a layer
            was not captured exactly once across pipeline stages (not a MoE layer).
    """
    check_process_groups(process_groups, "prior extraction")
    models = model if isinstance(model, (list, tuple)) else [model]
    runner = ForwardRunner(models, _device(), process_groups, train_length=shards.seq_length,
                           pad_multiple=settings.pad_multiple)
    layers = tuple(settings.layers)
    position = {layer: i for i, layer in enumerate(layers)}
    num_experts = writer.metadata.num_experts
    anchors = shards.samples(shards.anchor_language)

    if dist.get_rank() == 0:
        writer.prepare()
    dist.barrier()
    done = writer.finished_sample_ids()
    dist.barrier()  # everyone has read the finished set before anyone writes a new shard
    pending = [s for s in anchors if s.meta.sample_id not in done]
    dp, dp_rank = _size_and_rank(process_groups, "dp")
    _, tp_rank = _size_and_rank(process_groups, "tp")
    pp, pp_rank = _size_and_rank(process_groups, "pp")
    mine = _deal(pending, dp, dp_rank)
    is_writer = tp_rank == 0 and pp_rank == 0
    mbs, per_step = settings.micro_batch_size, settings.micro_batch_size * settings.num_microbatches
    capacity = shards.seq_length  # a packed row holds at most what training pads a sample to
    step_rows = _step_rows(_plan_rows(mine, capacity, settings), per_step)
    steps = _world_max(len(step_rows))

    start = time.perf_counter()
    done_samples = done_tokens = row_tokens = 0
    buffer_ids: list[str] = []
    buffer_rows: list[np.ndarray] = []
    for step in range(steps):
        rows = step_rows[step] if step < len(step_rows) else []
        rows = rows + [[]] * (per_step - len(rows))  # all-padding rows
        chunk = [mine[i] for row in rows for i in row]  # in segment-id order
        row_sequences = [[shards.tokens(mine[i])[:capacity] for i in row] for row in rows]
        lengths = [len(seq) for row in row_sequences for seq in row]
        longest = max([sum(len(seq) for seq in row) for row in row_sequences] + [0])
        seq_length = runner.padded_length(longest)
        laid = lay_out_rows(row_sequences, seq_length, settings.packing)
        microbatches = [laid.part(slice(m * mbs, (m + 1) * mbs))
                        for m in range(settings.num_microbatches)]
        n = max(len(chunk), 1)  # a replica out of samples still reduces a (zero) row
        records, nll = _run_step(runner, microbatches, layers, n, process_groups)

        priors = torch.zeros(n, len(layers), num_experts, device=_device())
        counts = torch.zeros(n, len(layers), device=_device())
        coverage = torch.zeros(settings.num_microbatches, len(layers), device=_device())
        for (m, layer), (seq_mean, token_count) in records.items():
            priors[:, position[layer]] += seq_mean.float()  # each sample is in one micro-batch
            counts[:, position[layer]] += token_count.float()
            coverage[m, position[layer]] += 1
        expected = torch.tensor(lengths + [0] * (n - len(lengths)), dtype=counts.dtype,
                                device=counts.device)
        for layer in sorted({layer for _, layer in records}):  # this stage's layers
            got = counts[:, position[layer]]
            if not torch.equal(got, expected):
                raise RuntimeError(
                    f"layer {layer}: routing counted {got.tolist()} tokens, the sequences have "
                    f"{expected.tolist()}: tokens were lost or double counted")
        if pp > 1:
            dist.all_reduce(priors, group=process_groups.pp)
            dist.all_reduce(coverage, group=process_groups.pp)
        if not torch.all(coverage == 1):
            bad = sorted({layers[j] for j in torch.nonzero(coverage != 1)[:, 1].tolist()})
            raise RuntimeError(f"layers {bad} were not captured exactly once across pipeline "
                               "stages: are they MoE layers of this model?")

        if is_writer and chunk:
            buffer_ids += [s.meta.sample_id for s in chunk]
            buffer_rows.append(priors[: len(chunk)].cpu().numpy())
            while len(buffer_ids) >= settings.flush_every:  # shards of flush_every samples
                rows_all, cut = np.concatenate(buffer_rows), settings.flush_every
                writer.write_shard(buffer_ids[:cut], rows_all[:cut])
                buffer_ids, buffer_rows = buffer_ids[cut:], [rows_all[cut:]]
        stats = _world_sum([
            len(chunk) if is_writer else 0,
            sum(lengths) if is_writer else 0,
            sum(a for a, _ in nll), sum(b for _, b in nll),
            per_step * seq_length if is_writer else 0,
        ])
        done_samples += int(stats[0])
        done_tokens += int(stats[1])
        row_tokens += int(stats[4])
        if progress and dist.get_rank() == 0:
            progress(ExtractionProgress(done_samples, len(pending), len(done), done_tokens,
                                        stats[2] / max(stats[3], 1.0),
                                        time.perf_counter() - start,
                                        done_tokens / max(row_tokens, 1)))
    if is_writer and buffer_ids:
        writer.write_shard(buffer_ids, np.concatenate(buffer_rows))
    dist.barrier()
    store = None
    if dist.get_rank() == 0:
        store = writer.finalize(s.meta.sample_id for s in anchors)
    dist.barrier()
    return {"samples_extracted": done_samples, "samples_resumed": len(done),
            "tokens": done_tokens, "fill_rate": done_tokens / max(row_tokens, 1),
            "elapsed_s": time.perf_counter() - start, "store": store}
