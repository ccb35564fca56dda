"""SARA: Semantically Anchored Routing Alignment on Megatron-Core."""

__version__ = "0.1.0"
