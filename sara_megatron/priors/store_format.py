"""The prior store on disk: sample id -> [L, N] anchor routing prior.

    <store>/store.json                  format, metadata, shard list with sha256; "complete"
    <store>/shards/prior-<h>.npy        [rows, L, N] float32, or uint16 holding bfloat16 bits
    <store>/shards/prior-<h>.ids.json   the rows' sample ids, the .npy's sha256, metadata digest

`<h>` is a hash of the shard's sample ids. A shard is written .npy first, then .ids.json (each
under a temporary name, renamed into place); it exists for readers once its .ids.json does.
store.json is rewritten with `"complete": true` and the shard list when extraction finishes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from sara_megatron.io import canonical_json, sha256_text
from sara_megatron.tool_errors import UserFacingError

STORE_FORMAT = "sara-prior-store/1"
STORE_JSON = "store.json"
SHARDS_DIR = "shards"
DTYPES = ("fp32", "bf16")


class PriorStoreError(UserFacingError, ValueError):
    """A prior store that cannot be used as asked (wrong model or corpus, corrupt, incomplete):
    the tools print it as one line."""


class MissingPriorError(UserFacingError, LookupError):
    """A sample id with no prior in the store (it was extracted from other shards)."""


@dataclasses.dataclass(frozen=True)
class PriorStoreMetadata:
    """What a prior store holds and was extracted from, recorded in store.json (field meanings
    in the comments).

    Raises:
        ValueError: an unknown dtype or compute dtype, or layers not sorted and unique.
    """

    layers: tuple[int, ...]  # global 0-based layer indices recorded, in storage order
    num_experts: int
    dtype: str  # "fp32" | "bf16"
    anchor_language: str
    model_fingerprint: str  # sara_megatron.priors.fingerprint.model_fingerprint
    corpus_fingerprint: str  # fingerprint of the anchor-language token shards
    # Precision of the model's weights and activations during extraction ("bf16": --bf16; the
    # router softmax is fp32 either way, but its input is not): priors computed in bf16 and in
    # fp32 differ, so one store must not mix them. None: a store written before this was
    # recorded (readable; not resumable, as its precision is unknown).
    compute_dtype: Optional[str] = "fp32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"prior dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise ValueError(f"compute dtype must be one of {DTYPES}, got {self.compute_dtype!r}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be sorted and unique, got {self.layers}")

    def to_json(self) -> dict:
        """The metadata as store.json records it (no `compute_dtype` key when it is None)."""
        obj = dict(dataclasses.asdict(self), layers=list(self.layers))
        if self.compute_dtype is None:
            # An older store's metadata round-trips unchanged, digest included (its shards'
            # .ids.json files hold that digest).
            del obj["compute_dtype"]
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> "PriorStoreMetadata":
        """The metadata a store.json records.

        Args:
            obj: store.json's "metadata" object.

        Returns:
            The metadata; `compute_dtype` None when the record has none.
        """
        # No "compute_dtype" key: written before it was recorded, so unknown — not the default.
        return cls(**dict(obj, layers=tuple(obj["layers"]),
                          compute_dtype=obj.get("compute_dtype")))

    def digest(self) -> str:
        """The sha256 of the canonical JSON of `to_json()` (each shard's ids file holds it)."""
        return sha256_text(canonical_json(self.to_json()))

    def differences(self, other: "PriorStoreMetadata") -> list[str]:
        """The fields that differ, as "name: mine vs other's" lines.

        Args:
            other: the metadata to compare with.
        """
        return [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def encode_priors(priors: np.ndarray, dtype: str) -> np.ndarray:
    """Priors as a store shard holds them.

    Args:
        priors: [n, L, N] priors (converted to fp32 first).
        dtype: the store's dtype, "fp32" or "bf16".

    Returns:
        [n, L, N] fp32, or bf16 bits as uint16 (rounded to nearest).
    """
    priors = np.ascontiguousarray(priors, dtype=np.float32)
    if dtype == "fp32":
        return priors
    bits = torch.from_numpy(priors).to(torch.bfloat16).view(torch.int16).numpy()
    return bits.view(np.uint16)


def decode_priors(stored: np.ndarray) -> np.ndarray:
    """The stored array -> fp32 (bf16 widens exactly).

    Args:
        stored: a shard's array, fp32 or bf16 bits as uint16.

    Raises:
        PriorStoreError: another dtype.
    """
    if stored.dtype == np.float32:
        return np.array(stored, dtype=np.float32)
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    raise PriorStoreError(f"unexpected stored prior dtype {stored.dtype}")


def stored_numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a store of `dtype` writes: float32 for "fp32", uint16 for "bf16".

    Args:
        dtype: the store's dtype.
    """
    return np.dtype(np.float32 if dtype == "fp32" else np.uint16)
