"""Training checkpoints: model, optimizer, LR schedule and data position, through dist_checkpointing.

Layout under `save_dir`:
    iter_0000040/            one torch_dist checkpoint per save
    latest_checkpointed_iteration.txt

A save writes `iter_N.tmp/` (with its sha256 manifest), renames it to `iter_N/` once every rank
has finished, and only then points `latest...txt` at it: a kill at any moment of a save leaves the
previous checkpoint as the latest, loadable. A resume checks the manifest (`resume_iteration`;
docs/integrity.md). RNG needs no saving (the trainer reseeds every step from (seed, step)); the
optimizer state is saved "fully_reshardable", so a run may resume at another TP/PP/EP layout.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Callable, Optional

import torch
import torch.distributed as dist

from sara_megatron.checkpointing.manifest import (
    CheckpointDamagedError,
    check_checkpoint_format,
    move_stamp,
    verify_checkpoint,
    write_checkpoint_manifest,
)
from sara_megatron.io import atomic_open
from sara_megatron.tool_errors import UserFacingError, disk_full_error

log = logging.getLogger(__name__)


class CannotResumeError(UserFacingError, RuntimeError):
    """A run folder or checkpoint this run cannot resume from, with the setting to change."""


LATEST_FILE = "latest_checkpointed_iteration.txt"
_OPTIMIZER_SHARDING = "fully_reshardable"
_ASIDE = ".old"  # an iteration's previous copy while a re-save of that iteration replaces it


def iteration_dir(save_dir: str, iteration: int) -> str:
    """The folder of one iteration's checkpoint, `<save_dir>/iter_NNNNNNN` (seven digits).

    Args:
        save_dir: A run's `checkpoint.save_dir`.
        iteration: The step it was saved at.
    """
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def latest_iteration(save_dir: Optional[str]) -> Optional[int]:
    """The iteration `latest...txt` names, or None when there is no complete checkpoint. A
    pointer that cannot be read (garbage, empty) falls back to the newest `iter_*` folder.

    Args:
        save_dir: A run's `checkpoint.save_dir`, or None (no checkpoint).

    Raises:
        CannotResumeError: `latest...txt` names an iteration whose folder is missing.
    """
    if not save_dir:
        return None
    path = os.path.join(save_dir, LATEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            iteration = int(f.read().strip())
        if iteration < 0:
            raise ValueError(iteration)
    except (ValueError, UnicodeDecodeError, OSError) as err:
        found = saved_iterations(save_dir)
        log.warning("%s cannot be read (%s): using the newest iteration folder instead (%s)",
                    path, err, iteration_dir(save_dir, found[-1]) if found else "none found")
        return found[-1] if found else None
    folder = iteration_dir(save_dir, iteration)
    if not os.path.isdir(folder):
        _restore_set_aside(folder)
    if not os.path.isdir(folder):
        raise CannotResumeError(f"{path} names iteration {iteration}, whose folder is missing")
    return iteration



def latest_checkpoint(save_dir: str | os.PathLike) -> str:
    """The folder of the newest complete checkpoint a run saved in `save_dir`.

    Args:
        save_dir: a training run's `checkpoint.save_dir`.

    Returns:
        Its `iter_N` folder that `latest_iteration` names.

    Raises:
        CannotResumeError: `save_dir` holds no complete checkpoint.
    """
    save_dir = os.fspath(save_dir)
    iteration = latest_iteration(save_dir)
    if iteration is None:
        raise CannotResumeError(f"{save_dir} holds no complete checkpoint")
    return iteration_dir(save_dir, iteration)

_ITERATION_DIR = re.compile(r"iter_(\d{7})")


def saved_iterations(save_dir: str) -> list[int]:
    """The iterations with a published folder in `save_dir` (not `.tmp` / `.old`), ascending.

    Args:
        save_dir: A run's `checkpoint.save_dir` (an unreadable one has none).
    """
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    return sorted(int(m.group(1)) for name in names
                  if (m := _ITERATION_DIR.fullmatch(name))
                  and os.path.isdir(os.path.join(save_dir, name)))


def resume_iteration(save_dir: Optional[str], strict: bool = False) -> Optional[int]:
    """Collective. The iteration to resume from: the latest, when its files match its manifest;
    else (a damaged latest) the newest intact older one, with a warning naming the damage, or,
    with `strict`, CheckpointDamagedError.

    Args:
        save_dir: A run's `checkpoint.save_dir`, or None.
        strict: Refuse a damaged latest checkpoint (`checkpoint.strict_resume`).

    Returns:
        The iteration, or None when there is no complete checkpoint.

    Raises:
        CheckpointDamagedError: The latest is damaged and `strict`, or no checkpoint is intact.
        CannotResumeError: `latest...txt` names a missing folder.
    """
    latest = latest_iteration(save_dir)
    if latest is None:
        return None
    candidates = [latest] + [i for i in reversed(saved_iterations(save_dir)) if i < latest]
    damage = []
    for iteration in candidates:
        try:
            verify_checkpoint(iteration_dir(save_dir, iteration))
        except CheckpointDamagedError as err:
            if strict:
                raise CheckpointDamagedError(err.folder, f"{err} (checkpoint.strict_resume: "
                                             "set it false to resume from the newest intact "
                                             "checkpoint instead)") from None
            damage.append(str(err))
            continue
        if damage:
            log.warning("%s; resuming from the newest intact checkpoint, %s",
                        "; ".join(damage), iteration_dir(save_dir, iteration))
        return iteration
    raise CheckpointDamagedError(save_dir, f"no intact checkpoint in {save_dir}: "
                                 + "; ".join(damage))


def _restore_set_aside(folder: str) -> None:
    """A re-save of `folder`'s iteration killed between moving the old copy aside and putting the
    new one in its place: the old copy, complete, goes back. Every rank may try; one rename wins."""
    try:
        os.rename(folder + _ASIDE, folder)
    except OSError:
        pass  # no copy aside, or another rank put it back first
    else:
        log.warning("%s: restored the copy set aside by a re-save that was killed", folder)


def _model_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def _trainable_names(module) -> set:
    return {name for name, param in module.named_parameters() if param.requires_grad}


def _sharded_state(chunks, optimizer, is_loading: bool, trainable_only: bool = False) -> dict:
    state = {}
    for i, chunk in enumerate(chunks):
        key = _model_key(i, len(chunks))
        module = chunk.module if hasattr(chunk, "module") else chunk
        state[key] = module.sharded_state_dict(prefix="")
        if trainable_only:  # LoRA: the frozen base is model.checkpoint's, not saved again
            keep = _trainable_names(module)
            state[key] = {k: v for k, v in state[key].items() if k in keep}
    # Every chunk's sharded tensors, nested per chunk: the chunks of a virtual-pipeline rank use
    # the same local names (decoder.layers.0. ...) for other global layers, so one flat dict would
    # keep only the last chunk's, and the optimizer would find no tensor for the others' params.
    model_state = dict(state)
    state["optimizer"] = optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": _OPTIMIZER_SHARDING}
    )
    return state


def save_training_checkpoint(
    save_dir: str, iteration: int, chunks, optimizer, scheduler, extra: dict,
    conversion_source: Optional[str] = None, trainable_only: bool = False,
    write_files: Optional[Callable[[str], None]] = None,
) -> str:
    """Collective. Save model, optimizer, LR schedule and trainer state as `iter_N/` and point
    `latest...txt` at it (staged in `iter_N.tmp/`, removed again if the save fails).

    Args:
        save_dir: The run's `checkpoint.save_dir`.
        iteration: The step saved (the folder's N).
        chunks: The model chunks of this rank (one, or several with virtual pipeline).
        optimizer: The megatron optimizer (its state saved "fully_reshardable").
        scheduler: The LR scheduler (its `state_dict`).
        extra: The trainer's state (data position, data-stream settings), saved as "trainer".
        conversion_source: The converted checkpoint training started from; its conversion
            metadata and HF assets (config, tokenizer) are carried into every save, so
            `convert_hf.py export` works on a training checkpoint as it is.
        trainable_only: Save only the parameters that train (LoRA adapters and router) with the
            optimizer state; the frozen base stays where it was loaded from.
        write_files: Called on rank 0 with the staging folder, before the manifest: files an
            objective keeps beside the weights (ShifCon's shift, sara.language_shift).

    Returns:
        The folder of the checkpoint written.

    Raises:
        DiskFullError: The disk filled up during the save.
    """
    from megatron.core import dist_checkpointing

    final = iteration_dir(save_dir, iteration)
    staging = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.exists(staging):  # left by a save that was killed
            shutil.rmtree(staging)
        os.makedirs(staging)
    dist.barrier()
    state = _sharded_state(chunks, optimizer, is_loading=False, trainable_only=trainable_only)
    state["scheduler"] = scheduler.state_dict()
    state["trainer"] = dict(extra, iteration=iteration, optimizer_parts=_optimizer_parts(optimizer),
                            optimizer_kinds=_optimizer_kinds(optimizer))
    try:
        dist_checkpointing.save(state, staging)
        dist.barrier()
        if dist.get_rank() == 0:
            _carry_conversion_metadata(conversion_source, staging)
            if write_files is not None:
                write_files(staging)
        write_checkpoint_manifest(staging)  # collective; inside the folder the rename publishes
    except BaseException as err:
        full = disk_full_error(err, staging)  # before the removal frees the space again
        # The partial save would hold the last free bytes (a full disk) until the next save.
        shutil.rmtree(staging, ignore_errors=True)
        if full is not None:
            raise full from err
        raise
    if dist.get_rank() == 0:
        _commit(save_dir, staging, final, iteration)
        log.info("saved %s", final)
    dist.barrier()
    return final


def _commit(save_dir: str, staging: str, final: str, iteration: int) -> None:
    """Put the finished `staging` in place as `final` and point `latest...txt` at it.

    `final` may already exist (a finished run re-launched resumes at its last iteration, trains
    nothing and saves it again) and may be the only checkpoint, named by `latest...txt`. Deleting
    it before the rename would leave, if killed in between, a pointer to a missing folder; it is
    moved aside instead, and `latest_iteration` puts it back if the new copy never arrived.
    """
    aside = final + _ASIDE
    if os.path.isdir(final):
        if os.path.exists(aside):  # left by an earlier re-save, killed after its swap
            shutil.rmtree(aside)
        os.rename(final, aside)
    os.rename(staging, final)
    move_stamp(staging, final)  # the files hashed for the manifest: a resume need not rehash
    with atomic_open(os.path.join(save_dir, LATEST_FILE)) as f:
        f.write(str(iteration))
    if os.path.exists(aside):
        shutil.rmtree(aside)


def _carry_conversion_metadata(source: Optional[str], folder: str) -> None:
    from sara_megatron.checkpointing.record import ASSETS_DIR, read_metadata, write_metadata

    record = read_metadata(source) if source else None
    if record is None:
        return
    # The weights are no longer the converted ones: say so, so that the source fingerprint is not
    # taken for these weights' fingerprint (sara_megatron.priors.fingerprint).
    record["training"] = {"base_checkpoint": os.path.abspath(source)}
    write_metadata(folder, record)
    if os.path.isdir(os.path.join(source, ASSETS_DIR)):
        shutil.copytree(os.path.join(source, ASSETS_DIR), os.path.join(folder, ASSETS_DIR))


def _optimizer_parts(optimizer) -> int:
    """How many optimizers megatron chains: dense and expert parameters get one each when
    expert parallel splits them into groups of their own."""
    return len(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def check_optimizer_layout(checkpoint_dir: str, saved_trainer: dict, optimizer) -> None:
    """Refuse to load optimizer state saved by another kind of optimizer (megatron-core can
    reshard one optimizer's state over TP/PP/DP, not turn one kind into another), with the
    setting that changed.

    Args:
        checkpoint_dir: The checkpoint's folder (named in the message).
        saved_trainer: The checkpoint's "trainer" entry (`optimizer_parts`, `optimizer_kinds`).
        optimizer: The optimizer this run built.

    Raises:
        CannotResumeError: The number of chained optimizers or their classes differ.
    """
    parts = saved_trainer.get("optimizer_parts", _optimizer_parts(optimizer))
    if parts != _optimizer_parts(optimizer):
        raise CannotResumeError(
            f"{checkpoint_dir} holds the state of {parts} chained optimizer(s) but this layout "
            f"builds {_optimizer_parts(optimizer)} (expert parallel switched on or off): "
            "megatron-core cannot reshard the optimizer across that change; resume at a layout "
            "with expert parallel as it was saved, or start a new run from this checkpoint's "
            "weights (model.checkpoint=its iteration folder, another checkpoint.save_dir)"
        )
    kinds = saved_trainer.get("optimizer_kinds")
    if kinds is not None and kinds != _optimizer_kinds(optimizer):
        raise CannotResumeError(
            f"{checkpoint_dir} holds the state of {', '.join(kinds)} but this run builds "
            f"{', '.join(_optimizer_kinds(optimizer))} (optim.distributed_optimizer or the "
            "precision changed): their states are laid out differently; resume with the "
            "checkpoint's settings"
        )


def _optimizer_kinds(optimizer) -> list[str]:
    """The class of each chained optimizer (DistributedOptimizer, FP32Optimizer, ...): their
    saved states have different layouts."""
    return [type(part).__name__ for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]]


def _initialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state entries a loaded one has (Adam moments and step).

    torch's Adam creates them at its first step; megatron's `DistributedOptimizer.state_dict`
    (which its sharded_state_dict calls, also for loading) reads them.
    """
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for part in parts:
        inner = part.optimizer
        if getattr(part, "init_state_fn", None) is not None:
            part.init_state_fn(inner, part.config)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


# Optimizer hyperparameters megatron keeps in each param group (besides lr and weight_decay,
# which the scheduler sets every step): loading an optimizer state would bring back the saved ones.
PARAM_GROUP_SETTINGS = ("max_lr", "min_lr", "betas", "eps")


def read_training_state(checkpoint_dir: str) -> dict:
    """The checkpoint's small non-sharded entries, read without loading a tensor: "trainer"
    (iteration, data position, data-stream settings), "scheduler" (the LR schedule's settings
    and step count) and "param_groups" (`PARAM_GROUP_SETTINGS` of each optimizer param group), so
    that a resume can be checked before the model is loaded.

    Args:
        checkpoint_dir: An `iter_N` folder.

    Returns:
        A dict with "trainer", "scheduler" and "param_groups".
    """
    from megatron.core import dist_checkpointing

    check_checkpoint_format(checkpoint_dir)
    common = dist_checkpointing.load_common_state_dict(checkpoint_dir)
    return {"trainer": common.get("trainer", {}), "scheduler": common.get("scheduler", {}),
            "param_groups": _saved_param_groups(common.get("optimizer", {}))}


def _saved_param_groups(node) -> list[dict]:
    """`PARAM_GROUP_SETTINGS` of every param group in a saved optimizer state (a chained
    optimizer nests one state per part)."""
    if isinstance(node, (list, tuple)):
        return [group for item in node for group in _saved_param_groups(item)]
    if not isinstance(node, dict):
        return []
    groups = []
    for key, value in node.items():
        if key == "param_groups" and isinstance(value, list):
            groups += [{k: g[k] for k in PARAM_GROUP_SETTINGS if k in g}
                       for g in value if isinstance(g, dict)]
        else:
            groups += _saved_param_groups(value)
    return groups


@torch.no_grad()
def load_training_checkpoint(checkpoint_dir: str, chunks, optimizer, scheduler,
                             trainable_only: bool = False) -> dict:
    """Collective. Restores model, optimizer and schedule; the optimizer's hyperparameters
    (`PARAM_GROUP_SETTINGS`) and the scheduler's settings stay the config's.

    Args:
        checkpoint_dir: The `iter_N` folder to load.
        chunks: The model chunks of this rank.
        optimizer: The optimizer this run built.
        scheduler: The LR scheduler (its step count is restored).
        trainable_only: The checkpoint holds only the trained parameters (LoRA); the rest of the
            model is left as it is (the base, loaded before).

    Returns:
        The trainer's extra state saved with it ("trainer": iteration, data position, ...).

    Raises:
        CannotResumeError: The optimizer's layout differs (`check_optimizer_layout`).
        RuntimeError: The checkpoint lacks tensors the model has.
    """
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(checkpoint_dir).get("trainer", {})
    check_optimizer_layout(checkpoint_dir, saved, optimizer)
    _initialize_optimizer_state(optimizer)
    # The config's hyperparameters, as the optimizer was built (see the load below).
    settings = [{k: g[k] for k in PARAM_GROUP_SETTINGS if k in g} for g in optimizer.param_groups]

    # Common (non-sharded) entries saved beside the shards come back in the loaded dict.
    loaded = dist_checkpointing.load(
        _sharded_state(chunks, optimizer, is_loading=True, trainable_only=trainable_only),
        checkpoint_dir)
    for i, chunk in enumerate(chunks):
        module = chunk.module if hasattr(chunk, "module") else chunk
        missing, _ = module.load_state_dict(loaded[_model_key(i, len(chunks))], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if trainable_only:
            missing = [k for k in missing if k in _trainable_names(module)]
        if missing:
            raise RuntimeError(f"checkpoint {checkpoint_dir} lacks tensors: {missing}")
    optimizer.load_state_dict(loaded["optimizer"])
    # megatron's optimizer load replaces whole param groups, hyperparameters included (the
    # scheduler reads each group's max_lr / min_lr): put the config's back. The trainer has
    # refused a resume whose settings differ unless optim.override_scheduler says the config wins.
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    # Restores the step count only: the trainer builds the scheduler with megatron's
    # override_opt_param_scheduler, so its settings stay the config's.
    scheduler.load_state_dict(loaded["scheduler"])
    log.info("resumed from %s", checkpoint_dir)
    return loaded["trainer"]
