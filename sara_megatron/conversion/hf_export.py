"""Megatron-Core torch_dist checkpoint → Hugging Face folder (safetensors, hub key layout).

Streams tensor by tensor in batches of at most `read_batch_bytes` (memory: one batch plus one
tensor, never the model); any layout, training checkpoints included (optimizer state skipped).
The checkpoint's files are checked against its manifest first, and a tensor holding NaN or inf
is refused, naming it, before the output is published. A ShifCon run's shift is copied along.
A LoRA run's checkpoint is refused here: `conversion.lora_export.export_merged` exports it
through this function. Details: docs/conversion.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Callable

import torch
import torch.distributed as dist

from sara_megatron.checkpointing.manifest import verify_checkpoint
from sara_megatron.checkpointing.record import ASSETS_DIR, METADATA_FILE, read_metadata
from sara_megatron.conversion import metadata as meta
from sara_megatron.conversion import progress
from sara_megatron.conversion.errors import ConversionError
from sara_megatron.conversion.hf_import import DTYPES, read_hf_config
from sara_megatron.conversion.mapping import EMBEDDING, ModelMapping, TensorMapping, build_mapping
from sara_megatron.conversion.safetensors_io import (
    INDEX_FILE,
    SafetensorsStreamWriter,
    TensorSpec,
    parse_size,
    plan_shards,
    shard_file_names,
)
from sara_megatron.model_folders import check_megatron_checkpoint
from sara_megatron.sara.language_shift import copy_shift_sidecar
from sara_megatron.tool_errors import disk_full_error

_HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


def refuse_multi_process_launch() -> None:
    """Export is one process writing one folder. Started by torchrun or srun, every rank would
    make its own one-process group and all would write the same output (with --overwrite, one
    deleting what another wrote): refuse before anything is read or written."""
    from sara_megatron.distributed import launcher_world_size

    world = launcher_world_size()
    if world > 1:
        raise ConversionError(
            f"export runs in one process, but this is one of {world} started by torchrun or srun "
            "(WORLD_SIZE / SLURM_STEP_NUM_TASKS), each of which would write the same output; run "
            "`python tools/convert_hf.py export ...` without a launcher (or with srun -n 1)"
        )


def ensure_process_group() -> None:
    """A one-process gloo group when none exists (megatron's loader asks for ranks); export is
    a single-process job."""
    refuse_multi_process_launch()
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    elif dist.get_world_size() != 1:
        raise ConversionError("export runs in one process; start it without torchrun")


def checkpoint_source(megatron_dir: str, hf_dir: str | None) -> tuple[dict, str | None, list[str]]:
    """The HF config, assets folder and asset names for a Megatron checkpoint.

    Taken from `hf_dir` when given, else from the checkpoint's conversion metadata (written by
    import, carried into the checkpoints of a training run started from an imported checkpoint).

    Args:
        megatron_dir: The Megatron checkpoint folder.
        hf_dir: An HF model folder with config.json and the tokenizer, or None to use the
            checkpoint's own metadata.

    Returns:
        `(hf_config, assets_dir, asset_names)`: the HF config dict, the folder holding the assets
        (None never for a found source) and the asset file names in it.

    Raises:
        ConversionError: `hf_dir` is None and the checkpoint carries no conversion metadata.
    """
    record = read_metadata(megatron_dir)
    if hf_dir is not None:
        hf_dir = os.path.abspath(hf_dir)
        return read_hf_config(hf_dir), hf_dir, meta.hf_asset_files(hf_dir)
    if record is None:
        raise ConversionError(
            f"{megatron_dir} has no {METADATA_FILE} (neither written by `convert_hf.py "
            f"import` nor trained from such a checkpoint); pass --hf-dir with the model's "
            f"config.json and tokenizer"
        )
    assets = os.path.join(megatron_dir, ASSETS_DIR)
    return record["hf_config"], assets, record.get("assets", [])


def checkpoint_tensor_metadata(megatron_dir: str) -> dict:
    """Checkpoint key → ShardedTensor (global shape, dtype) without reading tensor data.

    Args:
        megatron_dir: A Megatron-Core torch_dist checkpoint folder.

    Returns:
        A dict from checkpoint key to megatron's `ShardedTensor` metadata.

    Raises:
        ConversionError: The folder has no metadata.json (not a distributed checkpoint).
    """
    from megatron.core import dist_checkpointing

    if not os.path.exists(os.path.join(megatron_dir, "metadata.json")):
        raise ConversionError(f"{megatron_dir} is not a Megatron-Core distributed checkpoint "
                              "(no metadata.json)")
    return dist_checkpointing.load_tensors_metadata(megatron_dir)


# A training checkpoint's only tensors besides the weights are megatron's optimizer state, all of
# it under "optimizer." (Adam moments and main params "optimizer.state.*", the distributed
# optimizer's per-group buffers "optimizer.distributed.*"); a ChainedOptimizer (EP > 1 gives dense
# and expert parameters an optimizer each) puts "chained_<N>." in front of each part's keys. The
# scheduler, the trainer's position and the param groups are not tensors (common.pt); RNG state
# is not saved.
_OPTIMIZER_STATE = re.compile(r"(chained_\d+\.)*optimizer\.")


def is_optimizer_state(key: str) -> bool:
    """Whether a checkpoint tensor key is optimizer state (not a weight).

    Args:
        key: A checkpoint tensor key.
    """
    return _OPTIMIZER_STATE.match(key) is not None


def trainer_record(checkpoint_dir: str) -> dict:
    """The "trainer" entry a training checkpoint saves beside its tensors ({} for others).

    Args:
        checkpoint_dir: A Megatron-Core torch_dist checkpoint folder.
    """
    from megatron.core import dist_checkpointing

    record = (dist_checkpointing.load_common_state_dict(checkpoint_dir) or {}).get("trainer", {})
    return record if isinstance(record, dict) else {}


def has_lora_record(checkpoint_dir: str) -> bool:
    """Whether a Megatron checkpoint is a LoRA run's (adapters only, the base elsewhere).

    Args:
        checkpoint_dir: A Megatron-Core torch_dist checkpoint folder.
    """
    return (trainer_record(checkpoint_dir).get("peft") or {}).get("method") == "lora"


def check_checkpoint(mapping: ModelMapping, tensors: dict, where: str) -> None:
    """Raise naming missing / unexpected / wrongly shaped Megatron tensors.

    Optimizer state is not a weight and is skipped.

    Args:
        mapping: The model's mapping, giving the expected checkpoint keys and global shapes.
        tensors: Checkpoint key → ShardedTensor metadata (`checkpoint_tensor_metadata`).
        where: How the checkpoint is named in the error.

    Raises:
        ConversionError: A tensor is missing, unexpected or of another shape than the config
            implies.
    """
    expected = mapping.checkpoint_shapes()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(
        k for k in set(tensors) - set(expected) if not is_optimizer_state(k)
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for key in sorted(set(expected) & set(tensors)):
        got = tuple(tensors[key].global_shape)
        if got != expected[key]:
            problems.append(
                f"shape mismatch for {key}: checkpoint has {got}, "
                f"the config implies {expected[key]}"
            )
    if problems:
        raise ConversionError(
            f"{where} does not match its {mapping.arch.family} config: " + "; ".join(problems)
        )


def check_finite_tensor(key: str, tensor: torch.Tensor, where: str) -> None:
    """Refuse a weight holding NaN or inf (a run that diverged), naming it.

    Args:
        key: How the tensor is named in the error.
        tensor: The tensor to check (non-floating tensors pass).
        where: The checkpoint named in the error.

    Raises:
        ConversionError: The tensor holds a NaN or inf.
    """
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ConversionError(
            f"checkpoint {where}: tensor {key} holds {bad} non-finite value(s) (NaN or inf) of "
            f"{tensor.numel()}; the weights diverged: export an earlier checkpoint"
        )


def _batches(mappings: list[TensorMapping], tensors: dict, budget: int):
    batch, size = [], 0
    for m in mappings:
        nbytes = tensors[m.key].dtype.itemsize * int(torch.Size(m.shape).numel())
        if batch and size + nbytes > budget:
            yield batch
            batch, size = [], 0
        batch.append(m)
        size += nbytes
    if batch:
        yield batch


def _load_batch(megatron_dir: str, batch: list[TensorMapping], tensors: dict) -> list[torch.Tensor]:
    """The whole Megatron tensor of each mapping, read from the checkpoint in one load."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {}
    for j, m in enumerate(batch):
        info = tensors[m.key]
        local = (1,) * len(m.index) + m.shape
        request[f"t{j}"] = ShardedTensor(
            key=m.key,
            data=torch.empty(local, dtype=info.dtype),
            dtype=info.dtype,
            local_shape=local,
            global_shape=tuple(info.global_shape),
            global_offset=tuple(m.index) + (0,) * len(m.shape),
            axis_fragmentations=None,  # an arbitrary region: no regular grid
        )
    loaded = dist_checkpointing.load(request, megatron_dir, validate_access_integrity=False)
    return [loaded[f"t{j}"].reshape(m.shape) for j, m in enumerate(batch)]


def export_hf_checkpoint(
    megatron_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    hf_dir: str | os.PathLike | None = None,
    read_batch_bytes: int = 512 * 2**20,
    weights_dir: str | os.PathLike | None = None,
    adapt: Callable[[ModelMapping], Callable[[list, list], list]] | None = None,
) -> dict:
    """Write an HF folder `out` from the Megatron checkpoint `megatron_dir`.

    Args:
        megatron_dir: The Megatron-Core torch_dist checkpoint (an imported one or a training run's
            `iter_N/`).
        out: The HF folder to write; published atomically once complete.
        overwrite: Replace `out` if it exists (else an existing `out` is refused).
        dtype: The dtype to write ("bfloat16", "float32", "float16"); None keeps the checkpoint's.
        max_shard_size: The largest safetensors file, in bytes or as "5GB" / "500MB".
        hf_dir: An HF folder supplying config.json and the tokenizer when the checkpoint carries no
            conversion metadata.
        read_batch_bytes: The most bytes of Megatron tensors read from the checkpoint at once.
        weights_dir: where the weights are read, when not in `megatron_dir` (a LoRA run's
            base); config and assets still come from `megatron_dir` when it carries them.
        adapt: given the model's mapping, returns what turns each batch of tensors read from
            `weights_dir` into the ones to write: `f(batch mappings, tensors) -> tensors`
            (merging LoRA adapters). Checked before any tensor is read or written.

    Returns:
        A summary dict: `out`, `files` (names written), `tensors` (count), `bytes`, `seconds` and
        `shifcon_shift` (whether a ShifCon shift was copied along).

    Raises:
        ConversionError: Started as one of several processes, a LoRA checkpoint without `adapt`, an
            unknown `dtype`, no config source, a checkpoint that does not match its config, or a
            non-finite weight.
    """
    from sara_megatron.models.architecture import from_hf_config

    started = time.perf_counter()
    refuse_multi_process_launch()
    megatron_dir = os.path.abspath(os.fspath(megatron_dir))
    check_megatron_checkpoint(megatron_dir, "--megatron-dir")  # an HF or a run's folder: named
    output = meta.AtomicOutputDir(out, overwrite)
    output.check()
    ensure_process_group()
    weights_dir = os.path.abspath(os.fspath(weights_dir)) if weights_dir else megatron_dir
    if adapt is None and has_lora_record(megatron_dir):
        raise ConversionError(f"{megatron_dir} holds LoRA adapters only (the base is "
                              "elsewhere): export it with --merge-adapters (a merged model) or "
                              "--peft-adapter (the adapters in PEFT's layout)")
    source = megatron_dir if hf_dir or read_metadata(megatron_dir) else weights_dir
    hf_config, assets_dir, assets = checkpoint_source(source, hf_dir and os.fspath(hf_dir))
    arch = from_hf_config(hf_config)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dtype = DTYPES.get(dtype)

    tensors = checkpoint_tensor_metadata(weights_dir)
    padded = tuple(tensors[EMBEDDING].global_shape)[0] if EMBEDDING in tensors else None
    mapping = build_mapping(arch, padded)
    check_checkpoint(mapping, tensors, where=f"Megatron checkpoint {weights_dir}")
    adapt_batch = adapt(mapping) if adapt is not None else None
    verify_checkpoint(weights_dir)  # before any tensor data is read
    if weights_dir != megatron_dir:
        verify_checkpoint(megatron_dir)

    specs: list[TensorSpec] = []
    for m in mapping.mappings:
        for name in m.hf_names():
            written = out_dtype or tensors[m.key].dtype
            specs.append(TensorSpec(name, written, mapping.hf_shapes[name]))
    shards = plan_shards(specs, parse_size(max_shard_size))
    files = shard_file_names(len(shards))
    file_of = {s.name: files[i] for i, shard in enumerate(shards) for s in shard}

    output.prepare()
    writers: dict[str, SafetensorsStreamWriter] = {}
    try:
        remaining = {f: len(s) for f, s in zip(files, shards)}
        shard_specs = dict(zip(files, shards))
        for batch in _batches(mapping.mappings, tensors, read_batch_bytes):
            loaded = _load_batch(weights_dir, batch, tensors)
            if adapt_batch is not None:
                loaded = adapt_batch(batch, loaded)
            for m, tensor in zip(batch, loaded):
                for name, value in m.split(tensor).items():
                    check_finite_tensor(f"{name} (checkpoint key {m.key})", value, megatron_dir)
                    file = file_of[name]
                    if file not in writers:
                        writers[file] = SafetensorsStreamWriter(
                            os.path.join(output.partial, file), shard_specs[file]
                        )
                    writers[file].write(name, value.to(out_dtype) if out_dtype else value)
                    remaining[file] -= 1
                    if remaining[file] == 0:
                        writers.pop(file).close()
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in specs)},
                "weight_map": {s.name: file_of[s.name] for s in specs},
            }
            with open(os.path.join(output.partial, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        dtypes = {s.dtype for s in specs}
        config = dict(hf_config)
        if len(dtypes) == 1 and dtypes <= set(_HF_DTYPE_NAMES):
            name = _HF_DTYPE_NAMES[dtypes.pop()]
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
            for k in keys:
                config[k] = name
        meta.copy_assets(assets_dir, [a for a in assets if a != "config.json"], output.partial)
        shifted = copy_shift_sidecar(megatron_dir, output.partial)
        with open(os.path.join(output.partial, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        output.commit()
    except BaseException as err:
        full = disk_full_error(err, output.partial)  # before the removal frees the space
        for writer in writers.values():
            writer.abort()
        output.abort()
        if full is not None:
            raise full from err
        raise
    summary = {
        "out": output.out,
        "files": files,
        "tensors": len(specs),
        "bytes": sum(s.nbytes for s in specs),
        "seconds": round(time.perf_counter() - started, 2),
        "shifcon_shift": shifted,
    }
    progress("export", f"wrote {summary['tensors']} tensors in {len(files)} file(s) to "
                       f"{output.out} in {summary['seconds']}s"
                       + (" with its ShifCon shift (shifcon.json)" if shifted else ""))
    return summary
