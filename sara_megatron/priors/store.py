"""Reading a prior store: `store[sample_id] -> [L, N]`, `store.read(ids, layers) -> [L_sel, B, N]`.

Shards are memory-mapped, so a read touches only the rows asked for; the id -> (shard, row) index
is built once on open. Every shard file (priors and ids) is checked against the sha256 recorded in
store.json — all of them on open by default, or each on its first use with `verify="lazy"` — so a
flipped byte is an error, never a silently wrong prior. A store extracted from another model than
the one expected is refused.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from sara_megatron.io import read_json_file, sha256_file
from sara_megatron.priors.store_format import (
    SHARDS_DIR,
    STORE_FORMAT,
    STORE_JSON,
    MissingPriorError,
    PriorStoreError,
    PriorStoreMetadata,
    decode_priors,
    stored_numpy_dtype,
)
from sara_megatron.priors.store_writer import IDS_SUFFIX


def _read_store_json(path: str) -> dict:
    """The store's store.json, refused unless it is a complete store of this format."""
    store_json = os.path.join(path, STORE_JSON)
    if not os.path.exists(store_json):
        raise PriorStoreError(f"{path} is not a prior store (no {STORE_JSON}): give the "
                              "--output folder of tools/extract_priors.py")
    store = read_json_file(store_json, PriorStoreError)
    if not isinstance(store, dict) or store.get("format") != STORE_FORMAT:
        found = store.get("format") if isinstance(store, dict) else type(store).__name__
        raise PriorStoreError(f"{store_json}: format {found!r}, expected {STORE_FORMAT!r} "
                              "(not a prior store written by tools/extract_priors.py)")
    if not store.get("complete"):
        raise PriorStoreError(f"prior store {path} is incomplete: the extraction did not "
                              "finish (rerun tools/extract_priors.py to resume it)")
    return store


def read_prior_store_metadata(path: str | os.PathLike) -> PriorStoreMetadata:
    """A complete store's metadata alone (one small file read).

    Args:
        path: the store folder (`tools/extract_priors.py --output`).

    Raises:
        PriorStoreError: no store.json, another format, or an unfinished extraction.
    """
    return PriorStoreMetadata.from_json(_read_store_json(os.fspath(path))["metadata"])


class PriorStore:
    """A complete prior store opened for reading (see the module docstring).

    Args:
        path: the store folder.
        expected_model_fingerprint: the model fingerprint, or several any one of which will
            do; None: not checked.
        expected_corpus_fingerprint: the anchor shards' fingerprint; None: not checked.
        verify: "open" checks every shard file's sha256 now, "lazy" each on its first use.

    Raises:
        ValueError: another `verify`.
        PriorStoreError: not a complete store, another model or corpus, a missing or corrupt
            shard file, or inconsistent sample ids.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        expected_model_fingerprint: Optional[str | tuple[str, ...]] = None,  # any one will do
        expected_corpus_fingerprint: Optional[str] = None,
        verify: str = "open",
    ):
        if verify not in ("open", "lazy"):
            raise ValueError(f"verify must be 'open' or 'lazy', got {verify!r}")
        self.path = os.fspath(path)
        store = _read_store_json(self.path)
        self.metadata = PriorStoreMetadata.from_json(store["metadata"])
        self._check_expected("model", self.metadata.model_fingerprint, expected_model_fingerprint)
        self._check_expected("corpus", self.metadata.corpus_fingerprint,
                             expected_corpus_fingerprint)
        self._shards = store["shards"]
        self._verified: set[int] = set()
        self._arrays: dict[int, np.ndarray] = {}
        self._index: dict[str, tuple[int, int]] = {}
        self._sample_ids: list[str] = []
        # Global row g of the store = row g - _shard_starts[s] of shard s (shards in listed order).
        self._shard_starts = np.cumsum([0] + [shard["rows"] for shard in self._shards])
        for shard_index, shard in enumerate(self._shards):
            if verify == "open":
                self._verify(shard_index)
            with open(self._file(shard_index, IDS_SUFFIX), encoding="utf-8") as f:
                ids = json.load(f)["sample_ids"]
            if len(ids) != shard["rows"]:  # the global row numbering relies on it
                raise PriorStoreError(f"{self._file(shard_index, IDS_SUFFIX)} lists {len(ids)} "
                                      f"sample ids, store.json says {shard['rows']} rows")
            for row, sid in enumerate(ids):
                self._index[sid] = (shard_index, row)
            self._sample_ids += ids
        if len(self._index) != len(self._sample_ids):
            raise PriorStoreError(f"prior store {self.path} lists a sample id twice")
        self._position = {layer: i for i, layer in enumerate(self.metadata.layers)}

    def _check_expected(self, what: str, actual: str,
                        expected: Optional[str | tuple[str, ...]]) -> None:
        """`expected`: the fingerprint, or the fingerprints any one of which will do."""
        if expected is None:
            return
        accepted = (expected,) if isinstance(expected, str) else tuple(expected)
        if actual not in accepted:
            raise PriorStoreError(
                f"prior store {self.path} was extracted from a different {what}: its {what} "
                f"fingerprint is {actual}, expected {' or '.join(accepted)}. Re-extract the "
                f"priors for this {what} (tools/extract_priors.py)"
            )

    # --- files ------------------------------------------------------------------------------------

    def _file(self, shard_index: int, suffix: str) -> str:
        return os.path.join(self.path, SHARDS_DIR, self._shards[shard_index]["name"] + suffix)

    def _verify(self, shard_index: int) -> None:
        shard = self._shards[shard_index]
        for suffix, key in ((".npy", "sha256"), (IDS_SUFFIX, "ids_sha256")):
            path = self._file(shard_index, suffix)
            if not os.path.exists(path):
                raise PriorStoreError(f"prior store shard file {path} is missing")
            if sha256_file(path) != shard[key]:
                raise PriorStoreError(
                    f"prior store shard file {path} is corrupt: its sha256 differs from the one "
                    f"recorded in {os.path.join(self.path, STORE_JSON)}; re-extract the priors"
                )
        self._verified.add(shard_index)

    def _array(self, shard_index: int) -> np.ndarray:
        array = self._arrays.get(shard_index)
        if array is None:
            if shard_index not in self._verified:
                self._verify(shard_index)
            array = np.load(self._file(shard_index, ".npy"), mmap_mode="r", allow_pickle=False)
            expected = (self._shards[shard_index]["rows"], len(self.metadata.layers),
                        self.metadata.num_experts)
            if array.shape != expected or array.dtype != stored_numpy_dtype(self.metadata.dtype):
                raise PriorStoreError(
                    f"{self._file(shard_index, '.npy')}: {array.dtype}{list(array.shape)}, "
                    f"expected {stored_numpy_dtype(self.metadata.dtype)}{list(expected)}"
                )
            # A plain ndarray view of the memory map: indexing a np.memmap costs ~6x more.
            array = array.view(np.ndarray)
            self._arrays[shard_index] = array
        return array

    def __getstate__(self):
        # Data-loader workers reopen the memory maps; verification already done is kept.
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    # --- reads ------------------------------------------------------------------------------------

    @property
    def layers(self) -> tuple[int, ...]:
        """The recorded global 0-based layers, in storage order."""
        return self.metadata.layers

    @property
    def num_experts(self) -> int:
        """N, the experts per layer."""
        return self.metadata.num_experts

    @property
    def sample_ids(self) -> list[str]:
        """Every stored sample id, in global row order."""
        return list(self._sample_ids)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._index

    def _locate(self, sample_id: str) -> tuple[int, int]:
        try:
            return self._index[sample_id]
        except KeyError:
            raise MissingPriorError(
                f"sample id {sample_id!r} has no prior in the prior store {self.path} "
                f"({len(self)} samples, anchor language {self.metadata.anchor_language!r})"
            ) from None

    def missing(self, sample_ids: Iterable[str]) -> list[str]:
        """The ids of `sample_ids` the store has no prior for, in their order.

        Args:
            sample_ids: the ids to look up.
        """
        return [sid for sid in sample_ids if sid not in self._index]

    def layer_positions(self, layers: Optional[Sequence[int]]) -> np.ndarray:
        """Storage positions of global `layers`.

        Args:
            layers: global 0-based layers; None: all recorded layers.

        Returns:
            [L_sel] int64 positions on a stored row's layer axis.

        Raises:
            PriorStoreError: layers the store did not record (named).
        """
        if layers is None:
            return np.arange(len(self.metadata.layers))
        absent = [layer for layer in layers if layer not in self._position]
        if absent:
            raise PriorStoreError(f"layers {absent} were not recorded in prior store {self.path} "
                                  f"(recorded: {list(self.metadata.layers)})")
        return np.array([self._position[layer] for layer in layers], dtype=np.int64)

    def layer_selection(self, layers: Optional[Sequence[int]]) -> Union[slice, np.ndarray]:
        """What to index a stored row with for `layers`: a slice when they are stored
        contiguously (a view into the memory map, no gather), else their positions.

        Args:
            layers: global 0-based layers; None: all recorded layers.

        Raises:
            PriorStoreError: layers the store did not record (named).
        """
        positions = self.layer_positions(layers)
        if len(positions) and np.all(np.diff(positions) == 1):
            return slice(int(positions[0]), int(positions[-1]) + 1)
        return positions

    def stored_row(self, sample_id: str, selection: Union[slice, np.ndarray]) -> np.ndarray:
        """[L_sel, N] of one sample in the stored dtype (a view where possible): the cheap
        per-sample half of a batch read, done beside the sample's tokens.

        Args:
            sample_id: the sample.
            selection: `layer_selection`'s result.

        Returns:
            [L_sel, N] array (fp32, or bf16 bits as uint16).

        Raises:
            MissingPriorError: the store has no prior for the sample.
            PriorStoreError: its shard file is missing or corrupt.
        """
        shard_index, row = self._locate(sample_id)
        return self._array(shard_index)[row, selection]

    def stack(self, rows: Sequence[np.ndarray]) -> torch.Tensor:
        """A batch's priors from its `stored_row`s (one copy of each row).

        Args:
            rows: B `stored_row` arrays of one layer selection.

        Returns:
            [L_sel, B, N] float32.
        """
        num_layers, num_experts = rows[0].shape if rows else (0, self.metadata.num_experts)
        bf16 = self.metadata.dtype == "bf16"
        # bf16 bits widen to fp32 as the high half of a 32-bit word: copy into uint32, shift.
        out = np.empty((num_layers, len(rows), num_experts), np.uint32 if bf16 else np.float32)
        for i, row in enumerate(rows):
            out[:, i] = row
        if bf16:
            out <<= 16
            out = out.view(np.float32)
        return torch.from_numpy(out)

    def __getitem__(self, sample_id: str) -> torch.Tensor:
        """[L, N] float32 prior of one sample (all recorded layers)."""
        shard_index, row = self._locate(sample_id)
        return torch.from_numpy(decode_priors(self._array(shard_index)[row]))

    def read(self, sample_ids: Sequence[str], layers: Optional[Sequence[int]] = None
             ) -> torch.Tensor:
        """The priors of `sample_ids` (in that order) at global `layers`.

        Args:
            sample_ids: the batch's sample ids.
            layers: global 0-based layers; None: all recorded.

        Returns:
            [L_sel, B, N] float32.

        Raises:
            MissingPriorError: an id the store lacks.
            PriorStoreError: an unrecorded layer, or a missing or corrupt shard file.
        """
        selection = self.layer_selection(layers)
        return self.stack([self.stored_row(sid, selection) for sid in sample_ids])

    # --- bulk reads by global row (what a PriorTable is built from) ------------------------------

    def global_rows(self, sample_ids: Iterable[str]) -> np.ndarray:
        """[n] int64: each id's row in the store's global numbering (shards in listed order,
        `sample_ids[g]` is row g).

        Args:
            sample_ids: the ids to look up.

        Returns:
            [n] int64 global rows, in the ids' order.

        Raises:
            MissingPriorError: ids the store lacks (named).
        """
        sample_ids = list(sample_ids)
        missing = self.missing(sample_ids)
        if missing:
            raise MissingPriorError(
                f"{len(missing)} sample id(s) have no prior in the prior store {self.path}, e.g. "
                f"{missing[:5]}"
            )
        starts, index = self._shard_starts, self._index
        return np.fromiter((starts[index[sid][0]] + index[sid][1] for sid in sample_ids),
                           dtype=np.int64, count=len(sample_ids))

    def read_rows(self, global_rows: Sequence[int], layers: Optional[Sequence[int]] = None,
                  chunk_rows: int = 4096) -> np.ndarray:
        """[R, L_sel, N] float32 of the store's global rows `global_rows` (in that order) at
        global `layers`: read shard by shard, `chunk_rows` at a time so the only temporary is one
        chunk of the selected layers.

        Args:
            global_rows: rows in the store's global numbering (`global_rows`).
            layers: global 0-based layers; None: all recorded.
            chunk_rows: rows decoded at a time.

        Returns:
            [R, L_sel, N] float32.

        Raises:
            IndexError: rows outside the store.
            PriorStoreError: an unrecorded layer, or a missing or corrupt shard file.
        """
        rows = np.asarray(global_rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"global rows must lie in [0, {len(self)}) for prior store "
                             f"{self.path}, got [{rows.min()}, {rows.max()}]")
        selection = self.layer_selection(layers)
        num_layers = len(self.layer_positions(layers))
        out = np.empty((len(rows), num_layers, self.metadata.num_experts), np.float32)
        # Visit each shard once, in row order within it (sequential pages of the memory map).
        order = np.argsort(rows, kind="stable")
        bounds = np.searchsorted(rows[order], self._shard_starts)
        for shard_index in range(len(self._shards)):
            lo, hi = int(bounds[shard_index]), int(bounds[shard_index + 1])
            if lo == hi:
                continue
            array = self._array(shard_index)
            for start in range(lo, hi, chunk_rows):
                where = order[start:min(hi, start + chunk_rows)]
                local = rows[where] - self._shard_starts[shard_index]
                if isinstance(selection, slice):
                    stored = array[local, selection]
                else:  # [r, 1] x [1, L_sel] -> [r, L_sel, N] in one gather
                    stored = array[local[:, None], selection[None, :]]
                out[where] = decode_priors(stored)
        return out
