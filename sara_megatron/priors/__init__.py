"""Anchor routing priors: extraction from a Megatron model, the sharded prior store, and the
in-memory prior table the training loop gathers batches from."""

from sara_megatron.priors.fingerprint import model_fingerprint, prior_anchor_fingerprints
from sara_megatron.priors.layer_selection import parse_layer_selection
from sara_megatron.priors.store import PriorStore, read_prior_store_metadata
from sara_megatron.priors.store_format import (
    MissingPriorError,
    PriorStoreError,
    PriorStoreMetadata,
)
from sara_megatron.priors.store_writer import PriorStoreWriter
from sara_megatron.priors.table import PriorTable

__all__ = [
    "MissingPriorError",
    "PriorStore",
    "PriorStoreError",
    "PriorStoreMetadata",
    "PriorStoreWriter",
    "PriorTable",
    "model_fingerprint",
    "prior_anchor_fingerprints",
    "read_prior_store_metadata",
    "parse_layer_selection",
]
