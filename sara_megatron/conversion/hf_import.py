"""Hugging Face safetensors checkpoint → Megatron-Core torch_dist checkpoint, at any TP/EP/PP.

Every rank builds its own shard of the model and walks its `sharded_state_dict()`; `mapping.py`
turns each entry's region into row ranges of hub tensors, read by byte range straight into the
parameter's memory. So a rank reads only the bytes it owns and holds its shard, not the model;
`save_model_weights` then writes the checkpoint collectively. Single process (no launcher): the
whole model in one process. Details: docs/conversion.md.
"""

from __future__ import annotations

import gc
import os
import time

import torch
import torch.distributed as dist

from sara_megatron.checkpointing import save_model_weights
from sara_megatron.checkpointing.manifest import write_checkpoint_manifest
from sara_megatron.checkpointing.record import ASSETS_DIR, architecture_record, write_metadata
from sara_megatron.conversion import metadata as meta
from sara_megatron.conversion import progress
from sara_megatron.conversion.errors import ConversionError
from sara_megatron.conversion.mapping import ModelMapping, build_mapping
from sara_megatron.conversion.safetensors_io import SafetensorsCheckpoint
from sara_megatron.io import read_json_file, sha256_file

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_hf_config(hf_dir: str) -> dict:
    """The config.json of an HF model folder.

    Args:
        hf_dir: The HF model folder.

    Raises:
        ConversionError: The folder has no config.json, or it is not valid JSON.
    """
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"no config.json in {hf_dir}")
    return read_json_file(path, ConversionError)  # a bad byte or line: named with the file


def resolve_dtype(requested: str | None, reader: SafetensorsCheckpoint) -> torch.dtype:
    """The parameter dtype of an import: --dtype, or the source's own when all tensors share it.

    The source's dtype is kept when every tensor has the same one and it is bf16 or fp32; otherwise
    fp32.

    Args:
        requested: The --dtype value ("bf16" or "fp32"), or None to follow the source.
        reader: The opened HF checkpoint.

    Returns:
        The torch dtype to build the model in.

    Raises:
        ConversionError: `requested` is not one of the known dtypes.
    """
    if requested is not None:
        if requested not in DTYPES:
            raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    found = {e.dtype for e in reader.entries.values()}
    return found.pop() if len(found) == 1 and found <= set(DTYPE_NAMES) else torch.float32


def _sharded_tensors(model):
    """This rank's ShardedTensors, swiglu factories expanded (their data are views of the param)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    for value in nested_values(model.sharded_state_dict(prefix="")):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from (v for v in nested_values(built) if isinstance(v, ShardedTensor))
        elif isinstance(value, ShardedTensor):
            yield value
        elif not isinstance(value, ShardedObject):  # ShardedObjects: TE/extra state, not weights
            raise ConversionError(f"unexpected sharded state entry {type(value).__name__}")


@torch.no_grad()
def fill_model_from_hf(model, reader: SafetensorsCheckpoint, mapping: ModelMapping) -> set[str]:
    """Copy this rank's shard of every parameter from the hub tensors.

    Args:
        model: The built Megatron model (this rank's shard, any TP/EP/PP layout).
        reader: The opened HF checkpoint.
        mapping: The mapping for the model's padded vocabulary.

    Returns:
        The names of the hub tensors read.

    Raises:
        ConversionError: A model tensor's shape differs from the mapping's, an unexpected sharded
            state entry appears, or a parameter element is left unfilled (or NaN in the source).
    """
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.fill_(float("nan"))  # sentinel: whatever is still NaN afterwards was never written
    read_names: set[str] = set()

    def read(name, rows, rest, out=None):
        read_names.add(name)
        return reader.read(name, rows, rest, out=out)

    for sh in _sharded_tensors(model):
        n = sh.prepend_axis_num
        index = tuple(sh.global_offset[:n])
        m = mapping.get(sh.key, index)
        if tuple(sh.global_shape[n:]) != m.shape:
            raise ConversionError(
                f"shape mismatch for Megatron tensor {sh.key}{list(index)}: the model has "
                f"{tuple(sh.global_shape[n:])}, the mapping {m.shape}"
            )
        region = tuple(slice(o, o + s) for o, s in zip(sh.global_offset[n:], sh.local_shape))
        # Straight into the parameter's memory (swiglu halves are views of it too).
        m.read_region(region, read, out=sh.data)
    unfilled = [name for name, p in model.named_parameters()
                if p.is_floating_point() and torch.isnan(p).any()]
    if unfilled:
        raise ConversionError(
            f"parameters not (fully) filled from the checkpoint, or NaN in the source: {unfilled}"
        )
    return read_names


def load_hf_weights(model, hf_dir: str | os.PathLike) -> None:
    """Fill an already built model from an HF folder in memory, without writing a checkpoint.

    The same mapping and reads as `import_hf_checkpoint`.

    Args:
        model: The built Megatron model (this rank's shard, any layout); carries
            `sara_architecture`.
        hf_dir: The HF model folder.

    Raises:
        ConversionError: The folder's tensors do not match the architecture, or a parameter is
            left unfilled.
    """
    from megatron.core import parallel_state as ps

    arch = model.sara_architecture
    with SafetensorsCheckpoint(hf_dir) as reader:
        full = build_mapping(arch)
        full.check_hf_tensors({n: e.shape for n, e in reader.entries.items()}, where=str(hf_dir))
        tp = ps.get_tensor_model_parallel_world_size()
        fill_model_from_hf(model, reader, build_mapping(arch, arch.padded_vocab_size(tp)))


def _check_world_size(tp: int, ep: int, pp: int) -> None:
    """A layout needs tp·pp·ep processes (or a multiple): say how to start them."""
    from sara_megatron.distributed import launcher_world_size

    world = launcher_world_size()
    step = tp * pp * ep  # EP must divide the data-parallel size world / (tp·pp)
    if world % (tp * pp) or (world // (tp * pp)) % ep:
        raise ConversionError(
            f"--tp {tp} --ep {ep} --pp {pp} needs a multiple of {step} processes, this run has "
            f"{world}: start it with "
            f"`torchrun --nproc-per-node {step} tools/convert_hf.py import ...`"
        )


def _fingerprint(reader: SafetensorsCheckpoint, rank: int, world: int) -> dict[str, str]:
    """SHA-256 of every source file; ranks split the files and share the results."""
    mine = {f: sha256_file(os.path.join(reader.dir, f)) for f in reader.files[rank::world]}
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def import_hf_checkpoint(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tp: int = 1,
    ep: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert `hf_dir` into a Megatron-Core checkpoint folder `out`; collective under torchrun.

    Args:
        hf_dir: The HF model folder (config.json and safetensors).
        out: The checkpoint folder to write; published atomically once complete.
        tp: Tensor-parallel size of the layout built while converting.
        ep: Expert-parallel size.
        pp: Pipeline-parallel size.
        dtype: "bf16" or "fp32"; None keeps the source's dtype (see `resolve_dtype`).
        overwrite: Replace `out` if it exists (else an existing `out` is refused).

    Returns:
        The metadata record written beside the checkpoint.

    Raises:
        ConversionError: An unsupported architecture or layout, tensors that do not match the
            config, a process count that does not fit tp·ep·pp, or a full disk.
    """
    from sara_megatron.tool_errors import disk_full_error
    from sara_megatron.distributed import ParallelConfig, initialize_distributed
    from sara_megatron.models.architecture import from_hf_config
    from sara_megatron.models.builder import ModelOptions, build_model

    started = time.perf_counter()
    hf_dir = os.path.abspath(os.fspath(hf_dir))
    hf_config = read_hf_config(hf_dir)
    arch = from_hf_config(hf_config)  # raises for unsupported architectures, naming the supported
    arch.validate_parallel(tp=tp, ep=ep, pp=pp)
    output = meta.AtomicOutputDir(out, overwrite)
    output.check()
    reader = SafetensorsCheckpoint(hf_dir)
    # Shapes and names are checked against the full model before anything is built.
    ignored = build_mapping(arch).check_hf_tensors(
        {n: e.shape for n, e in reader.entries.items()}, where=f"HF checkpoint {hf_dir}"
    )
    params_dtype = resolve_dtype(dtype, reader)
    _check_world_size(tp, ep, pp)

    initialize_distributed(ParallelConfig(tp=tp, pp=pp, ep=ep))
    from megatron.core import parallel_state as ps

    rank, world = dist.get_rank(), dist.get_world_size()
    say = (lambda msg: progress("import", msg)) if rank == 0 else (lambda msg: None)
    if ignored:
        say(f"not converted (not weights): {ignored}")
    if rank == 0:
        output.prepare()
    dist.barrier()
    try:
        tp_size = ps.get_tensor_model_parallel_world_size()
        mapping = build_mapping(arch, arch.padded_vocab_size(tp_size))
        model = build_model(
            arch, ModelOptions(params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
                               perform_initialization=False)
        )
        t0 = time.perf_counter()
        with reader:
            read_names = fill_model_from_hf(model, reader, mapping)
        say(f"filled this rank's shard from {len(reader.files)} file(s) in "
            f"{time.perf_counter() - t0:.1f}s")
        gathered = [None] * world
        dist.all_gather_object(gathered, sorted(read_names))
        never_read = set(mapping.hf_shapes) - set().union(*map(set, gathered))
        if never_read:
            raise ConversionError(f"hub tensors no rank converted: {sorted(never_read)[:20]}")

        t0 = time.perf_counter()
        save_model_weights(model, output.partial)
        say(f"saved torch_dist checkpoint in {time.perf_counter() - t0:.1f}s")
        del model
        gc.collect()

        t0 = time.perf_counter()
        file_hashes = _fingerprint(reader, rank, world)
        say(f"fingerprinted source in {time.perf_counter() - t0:.1f}s")
        record = {
            "family": arch.family,
            "hf_config": hf_config,
            "architecture": architecture_record(arch),
            "vocab_size": arch.vocab_size,
            "padded_vocab_size": mapping.padded_vocab_size,
            "vocab_padding": "zeros in the padded rows of the embedding, output layer and "
                             "lm_head bias; export drops them",
            "dtype": DTYPE_NAMES[params_dtype],
            "layout": {"tp": tp, "ep": ep, "pp": pp, "world_size": world},
            "source": {
                "dir": hf_dir,
                "files": file_hashes,
                "fingerprint": meta.combined_fingerprint(file_hashes),
                "fingerprint_method": "sha256 of each safetensors file's bytes; fingerprint = "
                                      "sha256 over '<file> <sha256>\\n' lines in file-name order",
            },
            "assets": meta.hf_asset_files(hf_dir),
            "created": meta.now_utc(),
            "versions": {p: meta.package_version(p)
                         for p in ("megatron-core", "torch", "transformers", "safetensors")},
        }
        if rank == 0:
            assets_dir = os.path.join(output.partial, ASSETS_DIR)
            meta.copy_assets(hf_dir, record["assets"], assets_dir)
            write_metadata(output.partial, record)
            # The manifest again, now with the metadata and assets (the weights' hashes are
            # remembered from the save's manifest by the verification stamp).
            write_checkpoint_manifest(output.partial, collective=False)
            output.commit()
        dist.barrier()
    except BaseException as err:
        full = disk_full_error(err, output.partial)  # before the removal frees the space
        if world == 1:
            output.abort()
        if full is not None:
            raise full from err
        raise
    say(f"done: {output.out} in {time.perf_counter() - started:.1f}s")
    return record
