"""Triton kernels and their PyTorch references, imported as `sara_megatron.kernels`."""

from .routing_js import SequenceRoutingJS, SequenceRoutingJSFunction, sequence_routing_js
from .routing_js_reference import sequence_routing_js_reference

__all__ = [
    "SequenceRoutingJS",
    "SequenceRoutingJSFunction",
    "sequence_routing_js",
    "sequence_routing_js_reference",
]
