"""The megatron-core differences inside the supported range (0.16.1 through 0.19.x), in one place.

Each function finds what the installed megatron-core does by looking at it (a signature, a type,
a call on a stand-in), not at its version string: a fix back-ported to a patch release or
reverted later is then still handled right. docs/compatibility.md lists every difference, what
the project does about it on each version, and the test that shows it.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Optional

import torch

LOAD_BALANCING_LOSS = "load_balancing_loss"


# --- layer specs ------------------------------------------------------------------------------


def module_submodules(spec):
    """The submodules of a layer-spec entry: a `ModuleSpec`'s `.submodules` (megatron-core up to
    0.17), or the `submodules=` keyword of the `functools.partial` builder that 0.18 and later
    return for MLP and MoE entries. The object is returned, not a copy: setting a field on it
    changes what the spec builds.

    Args:
        spec: a `ModuleSpec` or a `functools.partial(module, submodules=...)`.

    Returns:
        The submodules dataclass (e.g. `MoESubmodules`, `SelfAttentionSubmodules`).
    """
    if isinstance(spec, functools.partial):
        if "submodules" not in spec.keywords:
            raise TypeError(f"layer spec builder {spec!r} has no submodules= keyword")
        return spec.keywords["submodules"]
    return spec.submodules


# --- the load-balancing loss ------------------------------------------------------------------


def lb_reduce_group_has_dp(kwargs: dict) -> bool:
    """Whether the reduce group of an `attach_and_log_load_balancing_loss` call spans data
    parallel: `reduce_group_has_dp=True` up to 0.17, `needs_dp_avg=False` from 0.18.

    Args:
        kwargs: The call's keyword arguments.
    """
    if "needs_dp_avg" in kwargs:
        return not kwargs["needs_dp_avg"]
    return bool(kwargs.get("reduce_group_has_dp", False))


@functools.lru_cache(maxsize=None)
def lb_token_count_multiplied_by_group() -> bool:
    """Whether megatron's `TopKRouter.attach_and_log_load_balancing_loss` multiplies the token
    count it is given by the TP×CP group size under per-token loss (0.19 does; 0.16.1–0.18 do not,
    and their load-balancing gradient comes out 1/(TP·CP) too small under sequence or context
    parallel).

    Found by calling the method on a stand-in router with a group of size 2 and reading the scale
    it puts on the loss's gradient. Nothing distributed runs: the stand-in group only has a size.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.moe.router import TopKRouter

    group = types.SimpleNamespace(size=lambda: 2, rank=lambda: 0)
    config = types.SimpleNamespace(num_layers=1, mtp_num_layers=None, mtp_use_repeated_layer=False)
    router = types.SimpleNamespace(
        config=config, layer_number=1, is_mtp_layer=False, calculate_per_token_loss=True,
        tp_cp_group=group,
    )
    name = "_sara_probe_load_balancing_scale"
    activation = torch.zeros(1, requires_grad=True)
    aux_loss = torch.ones((), requires_grad=True)
    has_dp = ("reduce_group_has_dp" if "reduce_group_has_dp" in inspect.signature(
        TopKRouter.attach_and_log_load_balancing_loss).parameters else None)
    extra = {has_dp: False} if has_dp else {}
    # The backward below creates the process-wide loss scale where none is set yet; megatron's
    # schedule later copies its own into an existing one, so leave it as it was found.
    saved_scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    try:
        out = TopKRouter.attach_and_log_load_balancing_loss(
            router, activation, 1.0, aux_loss, name, group, valid_token_count=1, **extra
        )
        (grad,) = torch.autograd.grad(out.sum(), aux_loss)
        scale = float(MoEAuxLossAutoScaler.main_loss_backward_scale)
    finally:
        _drop_tracker_entry(name)
        MoEAuxLossAutoScaler.main_loss_backward_scale = saved_scale
    multiplier = float(grad) / scale
    if multiplier not in (1.0, 2.0):
        raise RuntimeError(
            f"megatron-core's load-balancing scale is neither the token count nor the count "
            f"times the group size (x{multiplier}): this version is outside the supported range"
        )
    return multiplier == 2.0


def lb_token_count_argument(group_token_count, group_size: int):
    """The `valid_token_count` to hand megatron's `attach_and_log_load_balancing_loss`.

    Chosen so that the load-balancing gradient scale is the count over the whole TP×CP group,
    whichever version: the group's count where megatron uses it as given, the group's count /
    group size where it multiplies by the group size itself.

    Args:
        group_token_count: The number of tokens over the TP×CP group (an int or a tensor).
        group_size: The TP×CP group size.
    """
    if lb_token_count_multiplied_by_group():
        return group_token_count / group_size
    return group_token_count


# --- megatron's process-wide aux-loss tracker -------------------------------------------------


def _metrics_tracker():
    """megatron-core 0.18+'s `MoEMetricsTracker`, or None where the tracker is the legacy dict."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return None
    return get_moe_metrics_tracker()


def _legacy_tracker() -> dict:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return get_moe_layer_wise_logging_tracker()


def _drop_tracker_entry(name: str) -> None:
    tracker = _metrics_tracker()
    (tracker.metrics if tracker is not None else _legacy_tracker()).pop(name, None)


def forget_aux_losses() -> None:
    """Remove every entry of megatron's aux-loss tracker, so that the next model to log sizes
    them by its own layer count. (0.18+ returns a fresh dict from the legacy accessor, whose
    `.clear()` would remove nothing.)"""
    tracker = _metrics_tracker()
    (tracker.metrics if tracker is not None else _legacy_tracker()).clear()


def zero_aux_losses() -> None:
    """Zero every entry of megatron's aux-loss tracker (entries and sizes kept)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()


def aux_loss_values(name: str) -> Optional[torch.Tensor]:
    """This rank's per-layer values of aux loss `name` as logged so far (not reduced), or None.

    Args:
        name: The tracker entry ("load_balancing_loss", ...).

    Returns:
        The tracker's tensor itself, [num_layers], or None when nothing logged `name`.
    """
    tracker = _metrics_tracker()
    if tracker is not None:
        entry = tracker.metrics.get(name)
        return None if entry is None else entry.values
    entry = _legacy_tracker().get(name)
    return None if entry is None else entry["values"]


def reduced_aux_loss_values(name: str) -> Optional[torch.Tensor]:
    """The per-layer values of aux loss `name`, reduced over the ranks the way megatron logs them.

    Pipeline stages collected, summed over the reduce group, averaged over data parallel; None
    where no layer logged it. Collective over all ranks when present anywhere.

    Args:
        name: The tracker entry ("load_balancing_loss", ...).
    """
    tracker = _metrics_tracker()
    if tracker is not None:
        if name not in tracker.metrics:
            return None
        tracker._sync_metrics([name])
        return tracker.metrics[name].values
    from megatron.core.transformer.moe.moe_utils import reduce_aux_losses_tracker_across_ranks

    if name not in _legacy_tracker():
        return None
    reduce_aux_losses_tracker_across_ranks([name])
    return _legacy_tracker()[name]["values"]


def fit_aux_loss_tracker(name: str, num_layers: int) -> None:
    """Grow the tracker entry of `name` to `num_layers` values (zeros appended).

    It is sized by the first model that logs to it, and a deeper model built later in the same
    process (a test, a benchmark, an analysis beside training) would index past its end.

    Args:
        name: The tracker entry.
        num_layers: The number of layers of the model about to log.
    """
    values = aux_loss_values(name)
    if values is None or values.numel() >= num_layers:
        return
    grown = torch.cat([values, values.new_zeros(num_layers - values.numel())])
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.metrics[name].values = grown
    else:
        _legacy_tracker()[name]["values"] = grown


# --- checkpoints ------------------------------------------------------------------------------

# megatron-core's file of a torch_dist checkpoint's common (non-tensor) state up to 0.18; 0.19
# keeps that state inside the torch_dist files instead, and reads both.
LEGACY_COMMON_STATE_FILE = "common.pt"


def reads_common_state_inside_checkpoint() -> bool:
    """Whether the installed megatron-core reads a checkpoint whose common state is inside its
    torch_dist files (0.19 and later) and not in common.pt."""
    from megatron.core.dist_checkpointing import serialization

    return hasattr(serialization, "_legacy_common_state_exists")


def unreadable_checkpoint_reason(folder) -> Optional[str]:
    """Why the installed megatron-core cannot read the torch_dist checkpoint in `folder`, in one
    sentence, or None where it can (or `folder` is no torch_dist checkpoint at all).

    Args:
        folder: A checkpoint folder.
    """
    import os

    from megatron.core import __version__ as version

    if not os.path.isfile(os.path.join(folder, "metadata.json")):
        return None
    if os.path.exists(os.path.join(folder, LEGACY_COMMON_STATE_FILE)):
        return None
    if reads_common_state_inside_checkpoint():
        return None
    return (f"checkpoint {os.fspath(folder)} was saved by megatron-core 0.19 or later (its common "
            f"state is inside the torch_dist files, there is no {LEGACY_COMMON_STATE_FILE}), "
            f"which the installed megatron-core {version.split('+')[0]} cannot read: resume or "
            f"export it with megatron-core 0.19 (Python 3.12), or start from a checkpoint saved "
            f"by this version")


# --- context parallel -------------------------------------------------------------------------


def get_batch_on_this_cp_rank(batch: dict, cp_group):
    """megatron's `utils.get_batch_on_this_cp_rank` for plain (not hybrid) context parallel.

    0.18 and later take `is_hybrid_cp` as a required argument.

    Args:
        batch: Name → tensor, the sequence on dim 1 ([batch, seq, ...]; `attention_mask` on dim 2).
        cp_group: The context-parallel process group.

    Returns:
        The batch with each tensor cut to this CP rank's sequence chunks (megatron's load-balanced
        split into 2·CP chunks).
    """
    from megatron.core import utils

    function = utils.get_batch_on_this_cp_rank
    if "is_hybrid_cp" in inspect.signature(function).parameters:
        return function(batch, is_hybrid_cp=False, cp_group=cp_group)
    return function(batch, cp_group=cp_group)
