"""Dense routing observation: capture (priors, analysis) and the hook the SARA loss rides on."""

from sara_megatron.routing.capture import (
    LayerRouting,
    RoutingCapture,
    capture_routing,
    segment_ids_from_padding_mask,
)
from sara_megatron.routing.observers import RouterObserver, observe_routers

__all__ = [
    "LayerRouting",
    "RouterObserver",
    "RoutingCapture",
    "capture_routing",
    "observe_routers",
    "segment_ids_from_padding_mask",
]
