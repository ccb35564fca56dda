"""The one hook between Megatron's MoE routers and everything that reads router logits.

Our routers (`sara_megatron.models.router`) call `notify_router_logits` with each layer's logits
before top-k routing. Observers registered with `observe_routers` see the logits of every MoE layer
on this rank (global 0-based layer index, logits [S, B, N] in Megatron's token order, Megatron's
padding mask [S, B] with True = padding) and may return a scalar loss; the router attaches returned
losses to its routing probabilities with `MoEAuxLossAutoScaler`, the way Megatron attaches its own
load-balancing loss, so their gradients flow in the pipeline stage that owns the layer.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Protocol

import torch

_OBSERVERS: list["RouterObserver"] = []


class RouterObserver(Protocol):
    def __call__(
        self, layer: int, logits: torch.Tensor, padding_mask: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]: ...


@contextlib.contextmanager
def observe_routers(observer: RouterObserver) -> Iterator[RouterObserver]:
    """Register `observer` for the duration of the block (forward passes inside it)."""
    _OBSERVERS.append(observer)
    try:
        yield observer
    finally:
        _OBSERVERS.remove(observer)


def notify_router_logits(
    layer: int, logits: torch.Tensor, padding_mask: Optional[torch.Tensor]
) -> list[torch.Tensor]:
    """Called by the routers; returns the losses observers want attached to this layer."""
    losses = []
    for observer in tuple(_OBSERVERS):
        loss = observer(layer, logits, padding_mask)
        if loss is not None:
            losses.append(loss)
    return losses
