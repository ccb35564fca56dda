"""The one hook between Megatron's MoE routers and everything that reads router logits.

Our routers (`sara_megatron.models.router.ObservedTopKRouter`) show each layer's logits, before
top-k routing, to the observers installed on them. `observe_routers(model, observer)` installs an
observer on the routers of one model for the duration of a block: it sees the logits of every MoE
layer of that model on this rank (global 0-based layer index, logits [S, B, N] in Megatron's token
order, Megatron's padding mask [S, B] with True = padding) and may return a scalar loss; the
router attaches returned losses to its routing probabilities with `MoEAuxLossAutoScaler`, the way
Megatron attaches its own load-balancing loss, so their gradients flow in the pipeline stage that
owns the layer. The observers are state of the routers themselves, so another model in the same
process (a reference model, a teacher) never sees them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Protocol

import torch

from sara_megatron.models.router import ObservedTopKRouter


class RouterObserver(Protocol):
    """A callable shown each MoE layer's router logits; may return a scalar loss to attach.

    Called with the global 0-based layer index, the logits [S, B, N] in megatron's token order
    and megatron's padding mask [S, B] (True = padding, or None); returns a scalar tensor whose
    gradient flows through the routing probabilities, or None.
    """

    def __call__(
        self, layer: int, logits: torch.Tensor, padding_mask: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]: ...


def model_routers(model) -> list[ObservedTopKRouter]:
    """The observable routers of `model` (a module, or a list of virtual-pipeline chunks).

    Args:
        model: a model built by `models.builder.build_model`, or a list of its pipeline chunks.

    Raises:
        ValueError: the model holds no `ObservedTopKRouter`.
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, ObservedTopKRouter)]
    if not routers:
        raise ValueError("the model has no observable routers: build it with "
                         "sara_megatron.models.builder.build_model")
    return routers


@contextlib.contextmanager
def observe_routers(model, observer: RouterObserver) -> Iterator[RouterObserver]:
    """Show `observer` the router logits of `model` in the forward passes inside the block.

    Args:
        model: the model (or list of pipeline chunks) whose routers to observe.
        observer: called per MoE layer of this rank (see `RouterObserver`).

    Yields:
        `observer`, removed from the routers again when the block exits.

    Raises:
        ValueError: the model holds no observable routers.
    """
    routers = model_routers(model)
    for router in routers:
        router.router_observers = (*router.router_observers, observer)
    try:
        yield observer
    finally:
        for router in routers:
            router.router_observers = tuple(o for o in router.router_observers if o is not observer)
