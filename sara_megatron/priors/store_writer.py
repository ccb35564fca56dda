"""Writing a prior store, resumably, from several data-parallel ranks at once.

Each writer rank flushes its finished samples as a new shard (named by the hash of its ids, so
ranks never collide). A rerun after a kill reads the ids of the shards that made it to disk and
skips those samples. One rank `prepare`s the store first (creates it, or checks that the existing
one was made with the same metadata) and `finalize`s it last (checks every expected sample has
exactly one prior and writes the shard list with its checksums).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterable, Sequence

import numpy as np

from sara_megatron.io import (
    TMP_SUFFIX,
    canonical_json,
    commit_file,
    sha256_file,
    sha256_text,
    temporary_path,
    write_json_atomic,
)
from sara_megatron.priors.store_format import (
    SHARDS_DIR,
    STORE_FORMAT,
    STORE_JSON,
    PriorStoreError,
    PriorStoreMetadata,
    encode_priors,
)

IDS_SUFFIX = ".ids.json"


class PriorStoreWriter:
    """Writes a prior store: `prepare` on one rank, `write_shard` on each writer rank,
    `finalize` on one rank last.

    Args:
        path: the store folder.
        metadata: what the store will hold; its compute precision must be set.

    Raises:
        ValueError: `metadata.compute_dtype` is None.
    """

    def __init__(self, path: str | os.PathLike, metadata: PriorStoreMetadata):
        if metadata.compute_dtype is None:
            raise ValueError("a prior store being written records its compute precision: "
                             "compute_dtype None only describes stores written before that")
        self.path = os.fspath(path)
        self.metadata = metadata
        self.shards_dir = os.path.join(self.path, SHARDS_DIR)

    # --- one rank, before anyone writes --------------------------------------------------------

    def prepare(self) -> None:
        """Create the store, or check that the one on disk is for the same model, layers, dtype,
        compute precision and corpus; remove leftovers of interrupted shard writes."""
        store_json = os.path.join(self.path, STORE_JSON)
        if os.path.exists(store_json):
            with open(store_json, encoding="utf-8") as f:
                existing = json.load(f)
            old = PriorStoreMetadata.from_json(existing["metadata"])
            if old.compute_dtype is None:
                raise PriorStoreError(
                    f"prior store {self.path} was written before stores recorded the compute "
                    f"precision (--bf16): resuming it in {self.metadata.compute_dtype} could mix "
                    "bf16 and fp32 priors. Write to a new --output or delete it"
                )
            if old != self.metadata:
                raise PriorStoreError(
                    f"prior store {self.path} was extracted with other settings ("
                    + "; ".join(old.differences(self.metadata))
                    + "): write to a new --output or delete it"
                )
        else:
            os.makedirs(self.shards_dir, exist_ok=True)
            write_json_atomic(store_json, self._store_json([], complete=False))
        os.makedirs(self.shards_dir, exist_ok=True)
        for leftover in glob.glob(os.path.join(self.shards_dir, "*" + TMP_SUFFIX)):
            os.remove(leftover)
        for npy in glob.glob(os.path.join(self.shards_dir, "*.npy")):
            if not os.path.exists(npy[: -len(".npy")] + IDS_SUFFIX):
                os.remove(npy)  # its ids never made it to disk: the samples will be redone

    # --- every writer rank ------------------------------------------------------------------------

    def _shard_id_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.shards_dir, "*" + IDS_SUFFIX)))

    def _read_ids(self, ids_path: str) -> dict:
        with open(ids_path, encoding="utf-8") as f:
            info = json.load(f)
        if info["metadata_digest"] != self.metadata.digest():
            raise PriorStoreError(f"{ids_path} was written with other store metadata")
        return info

    def finished_sample_ids(self) -> set[str]:
        """The ids of the samples already in a shard on disk (a rerun skips them).

        Raises:
            PriorStoreError: a shard's ids file written with other store metadata.
        """
        done: set[str] = set()
        for ids_path in self._shard_id_files():
            done.update(self._read_ids(ids_path)["sample_ids"])
        return done

    def write_shard(self, sample_ids: Sequence[str], priors: np.ndarray) -> str:
        """Write the priors of `sample_ids` as one shard named by its ids' hash (each of its
        two files written atomically).

        Args:
            sample_ids: the n samples, in row order.
            priors: [n, L, N] fp32 priors, L the store's layers.

        Returns:
            The shard's name ("prior-<hash>").

        Raises:
            ValueError: no rows, ids and rows that differ in number, another [L, N], or
                non-finite priors.
        """
        n, num_layers, num_experts = priors.shape
        if n != len(sample_ids) or n == 0:
            raise ValueError(f"{len(sample_ids)} sample ids for {n} prior rows")
        if (num_layers, num_experts) != (len(self.metadata.layers), self.metadata.num_experts):
            raise ValueError(f"priors of shape [{num_layers}, {num_experts}] per sample, the store "
                             f"holds [{len(self.metadata.layers)}, {self.metadata.num_experts}]")
        if not np.all(np.isfinite(priors)):
            raise ValueError("priors contain NaN or Inf")
        name = "prior-" + sha256_text(canonical_json(list(sample_ids)))[:20]
        npy = os.path.join(self.shards_dir, name + ".npy")
        tmp = temporary_path(npy)
        with open(tmp, "wb") as f:
            np.save(f, encode_priors(priors, self.metadata.dtype), allow_pickle=False)
        commit_file(tmp, npy)
        write_json_atomic(os.path.join(self.shards_dir, name + IDS_SUFFIX), {
            "sample_ids": list(sample_ids),
            "rows": n,
            "sha256": sha256_file(npy),
            "metadata_digest": self.metadata.digest(),
        })
        return name

    # --- one rank, after everyone wrote -------------------------------------------------------

    def finalize(self, expected_ids: Iterable[str]) -> dict:
        """Check coverage (each expected sample exactly once, nothing else) and mark complete.

        Args:
            expected_ids: every anchor sample id of the corpus.

        Returns:
            The store.json record written (format, metadata, num_samples, shards).

        Raises:
            PriorStoreError: a sample in two shards, expected samples missing, or samples not
                in the corpus.
        """
        shards, seen = [], {}
        for ids_path in self._shard_id_files():
            info = self._read_ids(ids_path)
            name = os.path.basename(ids_path)[: -len(IDS_SUFFIX)]
            for sid in info["sample_ids"]:
                if sid in seen:
                    raise PriorStoreError(f"sample {sid!r} has priors in two shards: "
                                          f"{seen[sid]} and {name}")
                seen[sid] = name
            shards.append({"name": name, "rows": info["rows"], "sha256": info["sha256"],
                           "ids_sha256": sha256_file(ids_path)})
        expected = list(expected_ids)
        missing = [sid for sid in expected if sid not in seen]
        extra = sorted(set(seen) - set(expected))
        if missing or extra:
            raise PriorStoreError(
                f"prior store {self.path} does not match the corpus: {len(missing)} sample(s) "
                f"without a prior (e.g. {missing[:5]}), {len(extra)} not in the corpus "
                f"(e.g. {extra[:5]}); rerun the extraction"
            )
        store = self._store_json(shards, complete=True)
        write_json_atomic(os.path.join(self.path, STORE_JSON), store)
        return store

    def _store_json(self, shards: list[dict], complete: bool) -> dict:
        return {
            "format": STORE_FORMAT,
            "complete": complete,
            "metadata": self.metadata.to_json(),
            "num_samples": sum(s["rows"] for s in shards),
            "shards": shards,
        }
