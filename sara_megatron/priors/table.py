"""The anchor priors a training run needs, held in memory as one tensor and gathered by row.

    table = PriorTable.from_store(store, sample_ids, layers=range(7, 35))  # once, at start-up
    rows = table.rows(["id-7", "id-3"])                                    # [B] int64, once
    priors = table.gather(rows)                                            # [L_sel, B, N] fp32

Why a table: copying each batch's priors out of the memory-mapped store in the data loader slows
the loader down; read once into one layer-major [L_sel, rows, N] tensor, the loader hands out one
int per sample and the training loop gathers the batch's priors where they are used. Memory:
rows x L_sel x N x 4 bytes on every data-parallel rank; stores too large for that are read per
batch instead (`SaraDataConfig(prior_table=False)`; sizes in docs/data-and-priors.md).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from sara_megatron.priors.store import PriorStore
from sara_megatron.priors.store_format import MissingPriorError

RowIndices = Union[torch.Tensor, np.ndarray, Sequence[int]]


class PriorTable:
    """Priors float32 of a fixed set of sample ids, one row each, stored layer-major:
    `priors[l, row]` is layer `layers[l]` of `sample_ids[row]`'s prior.

    Args:
        priors: [L_sel, rows, N] float32.
        sample_ids: the sample id of each row, distinct.
        layers: the global 0-based layer of each first-axis entry.
        digest: the contents digest to carry (None: `contents_digest` of ids and layers); a
            batch's row indices are only gathered from a table of the same digest.

    Raises:
        ValueError: priors not float32 [L_sel, rows, N], shapes that do not match the ids and
            layers, or a sample id listed twice.
    """

    def __init__(self, priors: torch.Tensor, sample_ids: Sequence[str], layers: Sequence[int],
                 digest: Optional[str] = None):
        if priors.dim() != 3 or priors.dtype != torch.float32:
            raise ValueError(f"priors must be float32 [L_sel, rows, N], got {priors.dtype}"
                             f"{list(priors.shape)}")
        if priors.shape[0] != len(layers) or priors.shape[1] != len(sample_ids):
            raise ValueError(f"priors {list(priors.shape)} do not match {len(layers)} layers x "
                             f"{len(sample_ids)} sample ids")
        self.priors = priors.contiguous()
        self.sample_ids: tuple[str, ...] = tuple(sample_ids)
        self.layers: tuple[int, ...] = tuple(int(layer) for layer in layers)
        self._row_of = {sid: row for row, sid in enumerate(self.sample_ids)}
        if len(self._row_of) != len(self.sample_ids):
            raise ValueError("a prior table lists a sample id twice")
        # Names the table's contents (ids in row order, layers), not its values: a batch's row
        # indices carry the digest of the table they index, so gathering them from another
        # table (another loader's) is refused instead of giving other samples' priors.
        self.digest = digest or self.contents_digest(self.sample_ids, self.layers)

    @staticmethod
    def contents_digest(sample_ids: Sequence[str], layers: Sequence[int]) -> str:
        """The digest naming a table's contents (ids in row order, and layers), not its values.

        Args:
            sample_ids: the ids in row order.
            layers: the table's layers.

        Returns:
            "sha256:<hex digest>".
        """
        h = hashlib.sha256(repr(tuple(int(layer) for layer in layers)).encode())
        for sid in sample_ids:
            h.update(sid.encode())
            h.update(b"\0")
        return "sha256:" + h.hexdigest()

    @classmethod
    def from_store(cls, store: PriorStore, sample_ids: Iterable[str],
                   layers: Optional[Sequence[int]] = None,
                   chunk_rows: int = 4096) -> "PriorTable":
        """The priors of the distinct `sample_ids` at global `layers` (None: all recorded), rows
        in the store's order (one pass over its shards), read `chunk_rows` at a time so the
        build needs the table plus one chunk of memory.

        Args:
            store: the open prior store.
            sample_ids: the ids to hold (repeats are held once).
            layers: global 0-based layers; None: every recorded layer.
            chunk_rows: rows read from the store at a time.

        Returns:
            The table, on the CPU.

        Raises:
            MissingPriorError: ids the store lacks (named).
            PriorStoreError: layers the store did not record (named).
        """
        distinct = list(dict.fromkeys(sample_ids))
        store_rows = np.sort(store.global_rows(distinct))
        layers = store.layers if layers is None else tuple(int(layer) for layer in layers)
        store.layer_positions(layers)  # fails naming unrecorded layers before allocating
        priors = torch.empty((len(layers), len(store_rows), store.num_experts),
                             dtype=torch.float32)
        for start in range(0, len(store_rows), chunk_rows):
            chunk = store.read_rows(store_rows[start:start + chunk_rows], layers)  # [r, L, N]
            priors[:, start:start + len(chunk)] = torch.from_numpy(chunk).transpose(0, 1)
        all_ids = store.sample_ids
        return cls(priors, [all_ids[g] for g in store_rows], layers)

    @staticmethod
    def nbytes_for(num_rows: int, num_layers: int, num_experts: int) -> int:
        """The bytes a table of this shape takes (float32).

        Args:
            num_rows: distinct sample ids.
            num_layers: selected layers.
            num_experts: experts per layer.
        """
        return num_rows * num_layers * num_experts * 4

    # --- what it holds ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def num_experts(self) -> int:
        """N, the experts per layer."""
        return self.priors.shape[2]

    def __getitem__(self, sample_id: str) -> torch.Tensor:
        """[L_sel, N] prior of one sample (a view)."""
        return self.priors[:, int(self.rows([sample_id])[0])]

    @property
    def nbytes(self) -> int:
        """The bytes the priors take."""
        return self.priors.numel() * self.priors.element_size()

    @property
    def device(self) -> torch.device:
        """The device the priors live on."""
        return self.priors.device

    def rows(self, sample_ids: Iterable[str]) -> np.ndarray:
        """The table row of each id.

        Args:
            sample_ids: the ids to look up.

        Returns:
            [n] int64 rows, in the ids' order.

        Raises:
            MissingPriorError: ids the table lacks (named).
        """
        sample_ids = list(sample_ids)
        missing = [sid for sid in sample_ids if sid not in self._row_of]
        if missing:
            raise MissingPriorError(f"{len(missing)} sample id(s) are not in the prior table, "
                                    f"e.g. {missing[:5]}")
        return np.fromiter((self._row_of[sid] for sid in sample_ids), dtype=np.int64,
                           count=len(sample_ids))

    def sample_ids_at(self, rows: RowIndices) -> list[str]:
        """The sample id of each row (reads `rows` on the host).

        Args:
            rows: table rows, any shape (flattened), on any device.

        Raises:
            IndexError: rows outside the table.
        """
        rows = torch.as_tensor(rows).reshape(-1).tolist()
        outside = [r for r in rows if not 0 <= r < len(self)]
        if outside:
            raise IndexError(f"rows {outside[:5]} are outside this prior table of {len(self)}")
        return [self.sample_ids[r] for r in rows]

    # --- use --------------------------------------------------------------------------------------

    def to(self, device, non_blocking: bool = False) -> "PriorTable":
        """The same table on `device` (e.g. the GPU, where gathers take microseconds).

        Args:
            device: the target device.
            non_blocking: passed to `Tensor.to`.
        """
        return PriorTable(self.priors.to(device, non_blocking=non_blocking), self.sample_ids,
                          self.layers, self.digest)

    def gather(self, rows: RowIndices) -> torch.Tensor:
        """[L_sel, B, N] float32 (contiguous, on the table's device): column b = table row
        `rows[b]`. Out-of-range rows raise (on the GPU, as a device-side assert).

        Args:
            rows: [B] table rows (`rows`), on any device.

        Returns:
            [L_sel, B, N] float32 priors.
        """
        device = self.priors.device
        # Non-blocking only towards a GPU: there the gather is queued behind the copy on the same
        # stream; a non-blocking copy to the host could be read before it lands.
        rows = torch.as_tensor(rows, dtype=torch.int64).to(device,
                                                           non_blocking=device.type != "cpu")
        return self.priors.index_select(1, rows)
