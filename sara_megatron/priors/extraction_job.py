"""One prior-extraction run from files (`tools/extract_priors.py`): start Megatron at the requested
layout, build and load the model, describe the store and run `extraction.extract_priors`.

The store records the compute precision and both fingerprints (model and anchor shards), so a
rerun with other weights, other shards or the other precision is refused instead of mixed in.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import torch
import torch.distributed as dist

from sara_megatron.checkpointing import load_model_weights
from sara_megatron.checkpointing.record import ASSETS_DIR, kept_hf_config
from sara_megatron.data.token_shards import TokenShards
from sara_megatron.distributed import (
    ParallelConfig,
    initialize_distributed,
    launcher_world_size,
    model_process_groups,
)
from sara_megatron.model_folders import check_megatron_checkpoint
from sara_megatron.models.architecture import resolve_architecture
from sara_megatron.models.builder import ModelOptions, build_model
from sara_megatron.priors.extraction import ExtractionProgress, ExtractionSettings, extract_priors
from sara_megatron.priors.fingerprint import model_fingerprint
from sara_megatron.priors.layer_selection import parse_layer_selection
from sara_megatron.priors.store_format import PriorStoreMetadata
from sara_megatron.priors.store_writer import PriorStoreWriter
from sara_megatron.tool_errors import UserFacingError


class ExtractionInputError(UserFacingError, ValueError):
    """Inputs that cannot go together: a model that cannot be named, shards of another tokenizer,
    layers or a parallel layout outside the model."""


@dataclasses.dataclass(frozen=True)
class ExtractionJob:
    """One extraction run's inputs, as `tools/extract_priors.py`'s flags give them (field
    meanings in the comments)."""

    shards: str  # token shard folder
    checkpoint: str  # Megatron checkpoint folder (torch_dist)
    output: str  # prior store folder
    model: Optional[str] = None  # preset or HF config.json; None: <checkpoint>/hf_assets/
    layers: str = "all"  # 'all', '7-34' or '0,3,8-11'
    dtype: str = "fp32"  # storage dtype of the priors
    tp: int = 1
    ep: int = 1
    pp: int = 1
    micro_batch_size: int = 1
    num_microbatches: Optional[int] = None  # None: the PP size, to fill the pipeline
    flush_every: int = 256
    packing: bool = True  # several samples per row (ExtractionSettings.packing)
    bf16: bool = False  # bf16 weights and activations (the router softmax stays fp32)
    verify_shards: bool = True


class ProgressPrinter:
    """Progress on stderr (rank 0), at most every `interval_s` seconds and at the end.

    Args:
        interval_s: the least time between two lines, in seconds.
    """

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self.last = -float("inf")

    def __call__(self, p: ExtractionProgress) -> None:
        finished = p.samples_done >= p.samples_total
        if p.elapsed_s - self.last < self.interval_s and not finished:
            return
        self.last = p.elapsed_s
        rate = p.samples_done / max(p.elapsed_s, 1e-9)
        eta = (p.samples_total - p.samples_done) / max(rate, 1e-9)
        print(f"extract_priors: {p.samples_done}/{p.samples_total} samples "
              f"({p.already_done} from an earlier run), {p.tokens_done} tokens, "
              f"{rate:.2f} samples/s, anchor NLL {p.mean_nll:.3f}, eta {eta:.0f}s",
              file=sys.stderr, flush=True)


def shared_model_fingerprint(checkpoint: str) -> str:
    """The checkpoint's model fingerprint, computed once on rank 0 (hashing a large checkpoint
    is slow) and broadcast (collective over the world).

    Args:
        checkpoint: the Megatron checkpoint folder.
    """
    box = [model_fingerprint(checkpoint) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def job_architecture(job: ExtractionJob):
    """The architecture of `job.model`, else of the config.json the converter kept beside the
    checkpoint.

    Args:
        job: the extraction job.

    Raises:
        ExtractionInputError: no `job.model` and no kept config.json.
    """
    if job.model:
        return resolve_architecture(job.model)
    config = kept_hf_config(job.checkpoint)
    if config is None:
        raise ExtractionInputError(f"{job.checkpoint} was not made by tools/convert_hf.py (no "
                                   f"{ASSETS_DIR}/config.json): name the model with --model")
    return resolve_architecture(config)


def check_job_inputs(job: ExtractionJob):
    """Every check of the job's flags against the model and the world, on every rank before any
    collective (a rank that passed would wait for one that did not).

    Args:
        job: the extraction job.

    Returns:
        (the selected global 0-based layers, the model's `MoEArchitecture`).

    Raises:
        ExtractionInputError: --layers outside the model, a layout that does not divide it or
            the world size, or a model that cannot be named.
        model_folders.NotACheckpointError: --checkpoint is not a Megatron-Core checkpoint.
    """
    check_megatron_checkpoint(job.checkpoint, "--checkpoint")
    arch = job_architecture(job)
    try:
        arch.validate_parallel(tp=job.tp, ep=job.ep, pp=job.pp)
        ParallelConfig(tp=job.tp, ep=job.ep, pp=job.pp).validate_world(launcher_world_size())
    except ValueError as err:
        raise ExtractionInputError(f"--tp {job.tp} --ep {job.ep} --pp {job.pp}: {err}") from None
    try:
        layers = parse_layer_selection(job.layers, arch.num_layers)
    except ValueError as err:
        raise ExtractionInputError(f"--layers {job.layers}: {err}") from None
    return layers, arch


def run_extraction_job(job: ExtractionJob) -> dict:
    """Collective: (re)initialise Megatron at the job's layout and extract the store; rank 0
    prints progress and a summary.

    Args:
        job: the extraction job.

    Returns:
        `extract_priors`' result.

    Raises:
        ExtractionInputError: flags that do not fit the model or world (`check_job_inputs`), or
            shards tokenised with a larger vocabulary than the model embeds.
    """
    layers, arch = check_job_inputs(job)
    shards = TokenShards(job.shards, verify=job.verify_shards)
    vocab = shards.vocab_size
    if vocab > arch.vocab_size:
        raise ExtractionInputError(f"the shards' tokenizer has {vocab} ids, the model embeds "
                                   f"{arch.vocab_size}: sharded with another model's tokenizer?")

    initialize_distributed(ParallelConfig(tp=job.tp, ep=job.ep, pp=job.pp))
    dtype = torch.bfloat16 if job.bf16 else torch.float32
    model = build_model(arch, ModelOptions(params_dtype=dtype, bf16=job.bf16))
    load_model_weights(model, job.checkpoint)
    metadata = PriorStoreMetadata(
        layers=layers,
        num_experts=arch.num_experts,
        dtype=job.dtype,
        anchor_language=shards.anchor_language,
        model_fingerprint=shared_model_fingerprint(job.checkpoint),
        # From the anchor shards' files as they are (verified), not copied from the manifest.
        corpus_fingerprint=shards.language_fingerprint(shards.anchor_language),
        compute_dtype="bf16" if job.bf16 else "fp32",
    )
    settings = ExtractionSettings(
        layers=layers,
        micro_batch_size=job.micro_batch_size,
        num_microbatches=job.pp if job.num_microbatches is None else job.num_microbatches,
        flush_every=job.flush_every,
        packing=job.packing,
    )
    result = extract_priors(model, shards, PriorStoreWriter(job.output, metadata), settings,
                            progress=ProgressPrinter(), process_groups=model_process_groups())
    if dist.get_rank() == 0:
        print(f"extract_priors: {result['store']['num_samples']} samples in {job.output} "
              f"({result['samples_extracted']} extracted now, {result['samples_resumed']} "
              f"resumed; layers {layers[0]}..{layers[-1]} ({len(layers)}), "
              f"{arch.num_experts} experts, {job.dtype}, computed in {metadata.compute_dtype}; "
              f"rows {100 * result['fill_rate']:.1f}% real tokens{' packed' if job.packing else ''}) "
              f"in {result['elapsed_s']:.1f}s")
    return result
