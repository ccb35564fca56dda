"""The SARA training data: token micro-batches with the anchor priors of exactly their samples.
The loader is built by `priors.loader.build_sara_data_loader`, which opens the prior store and
hands this module what it needs of it (`PriorRows`, `StoredPriors`):

    loader = build_sara_data_loader(SaraDataConfig(shards_dir=..., prior_store=...,
                                                   prior_layers=range(7, 35), micro_batch_size=4),
                                    dp_rank, dp_size, consumed_samples=resume_from,
                                    prior_device="cuda")
    for batch in loader:   # SaraMicroBatch
        batch = batch.to("cuda", non_blocking=True).with_priors(loader.prior_table)
        batch.tokens, batch.labels, batch.loss_mask, batch.padding_mask  # [B, S]
        batch.sample_ids                                                 # B ids
        batch.priors                                                     # [L_sel, B, N] fp32

With `packing=True` a row holds several whole samples (data/packing.py, data/packed_loader.py):
`sample_ids` and the priors' B are then the samples, not the rows, and `segment_ids` maps each
token to its sample. With `anchor_rows=True` batches carry their samples' anchor translations
(online priors, ShifCon; data/anchor_rows.py): one per row unpacked, packed by the same rule
(with `anchor_position_ids` and `anchor_segment_ids`, segment k = sample k) when packing.

A target-language sample is trained against the prior of its anchor (same sample id); when the
anchors themselves train too (`languages="all"`), against their own prior. Priors are looked up by
sample id, never by position, and the prior store must cover every training sample, come from the
anchor shards of this corpus and (if given) from the expected model.

How the priors travel (`SaraDataConfig.prior_table`):
- True (default): when the loader is built, the selected layers of every training sample's anchor
  prior are read once into a `PriorTable` (`loader.prior_table`, on `prior_device`), and each
  sample's table row is looked up once by sample id. Batches carry `prior_rows` [B] int64 and
  `priors=None`; `batch.with_priors(loader.prior_table)` gathers [L_sel, B, N] where the table
  lives. The loader then does no prior copying at all. Memory: 4 x L_sel x N bytes per distinct
  anchor sample (Qwen3, 28 layers x 128 experts: 14.3 KB; 10k anchors ~ 143 MB) per rank.
- False: for stores too large to hold, the loader reads each batch's priors from the memory-mapped
  store beside the tokens (batch.priors filled, prior_rows None; `with_priors` is a no-op), at
  about a fifth of the loader's throughput at the Qwen3 shape on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from sara_megatron.data.batch import pack_tokens
from sara_megatron.data.sample_order import GlobalSampleOrder, RankMicroBatchSampler
from sara_megatron.data.token_shards import ShardedSample, TokenShards


class PriorRows(Protocol):
    """What the loader reads of a prior table (`priors.table.PriorTable`): each sample's row,
    once, and a batch's priors gathered from its rows where the table lives."""

    digest: str

    def rows(self, sample_ids: Iterable[str]) -> np.ndarray:
        """The table rows of samples' anchor priors.

        Args:
            sample_ids: The samples.

        Returns:
            [n] int64 row indices.
        """

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """A batch's priors.

        Args:
            rows: [B] int64 row indices (`rows`).

        Returns:
            [L_sel, B, N] float32, on the table's device.
        """


class StoredPriors(Protocol):
    """What the loader reads of a prior store per batch (`priors.store.PriorStore`)."""

    def layer_selection(self, layers: Optional[Sequence[int]]) -> Union[slice, np.ndarray]:
        """Which stored layers to read.

        Args:
            layers: Global layer numbers (None: all stored).

        Returns:
            An index into the stored layer axis.
        """

    def stored_row(self, sample_id: str, selection: Union[slice, np.ndarray]) -> np.ndarray:
        """One sample's stored prior.

        Args:
            sample_id: The sample.
            selection: From `layer_selection`.

        Returns:
            [L_sel, N].
        """

    def stack(self, rows: Sequence[np.ndarray]) -> torch.Tensor:
        """A batch's priors from its samples' rows.

        Args:
            rows: [L_sel, N] each (`stored_row`).

        Returns:
            [L_sel, B, N] float32.
        """


@dataclasses.dataclass(frozen=True)
class SaraDataConfig:
    """The training data: shards, priors, languages and the loader's settings (see the field
    comments; the run config's `data` section)."""

    shards_dir: str
    prior_store: Optional[str] = None  # None: no priors (plain fine-tuning)
    prior_layers: Optional[Sequence[int]] = None  # global layers for the JS loss; None: all stored
    # "targets": every non-anchor language of the shards; "all": anchors too; or explicit codes
    # (a list, or one code as a string: "hi").
    languages: Union[str, Sequence[str]] = "targets"
    seq_length: Optional[int] = None  # None: the shards' (longer samples are cut)
    micro_batch_size: int = 1
    epochs: int = 1
    seed: int = 1234
    shuffle: bool = True
    pad_id: int = 0
    expected_model_fingerprint: Optional[str | tuple[str, ...]] = None  # any one will do
    verify_prior_store: str = "open"  # "open" | "lazy"
    # sha256 of the token shards against their manifest on first open (a stamp beside each shard
    # remembers it); structure and token ids are checked either way (shard_verification).
    verify_shards: bool = True
    # True: hold the priors in a PriorTable, batches carry row indices (see the module doc);
    # False: read each batch's priors from the store in the loader (stores too large to hold).
    prior_table: bool = True
    # Batches also carry their samples' anchor-language rows (anchor_tokens,
    # anchor_padding_mask; packed: also anchor_position_ids, anchor_segment_ids) for online
    # priors (sara.priors: online) and ShifCon (data/anchor_rows.py).
    anchor_rows: bool = False
    # Several whole samples per row (data/packing.py); needs build_sara_data_loader's
    # global_batch_size. Batches then carry position_ids, segment_ids and step_micro_batches.
    packing: bool = False


@dataclasses.dataclass
class SaraMicroBatch:
    """One micro-batch of the training loader (shapes in the field comments)."""

    tokens: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64: next token
    loss_mask: torch.Tensor  # [B, S] float32: 1 where the label is a response token
    padding_mask: torch.Tensor  # [B, S] bool: True = padding (Megatron's convention)
    sample_ids: list[str]
    languages: list[str]
    # [L_sel, B, N] float32, column b = sample_ids[b]'s anchor prior. From a PriorTable loader,
    # None until `with_priors(loader.prior_table)`; from the per-batch store read, set.
    priors: Optional[torch.Tensor]
    prior_layers: tuple[int, ...]  # the global layer of each of the L_sel rows
    # [B] int64 table row of sample_ids[b]'s anchor prior in the loader's PriorTable (None
    # without priors or with the per-batch store read), and the digest of that table.
    prior_rows: Optional[torch.Tensor] = None
    prior_table_digest: Optional[str] = None
    # [B, S] the anchor translation of each sample (same padding length), when asked for.
    # Packed: [R_a, S] the anchors of the micro-batch's samples packed into their own R_a rows.
    anchor_tokens: Optional[torch.Tensor] = None
    anchor_padding_mask: Optional[torch.Tensor] = None
    # Packed batches (data/packing.py): [B, S] positions restarting at 0 for each sample, and
    # [B, S] segment ids, the index of each token's sample in sample_ids (-1 = padding); the
    # step's number of micro-batches on this rank. None: one sample per row.
    position_ids: Optional[torch.Tensor] = None
    segment_ids: Optional[torch.Tensor] = None
    step_micro_batches: Optional[int] = None
    # Packed anchor rows: [R_a, S] positions within each anchor, and segment ids where segment k
    # is the anchor of sample_ids[k] (-1 = padding). None unpacked or without anchor rows.
    anchor_position_ids: Optional[torch.Tensor] = None
    anchor_segment_ids: Optional[torch.Tensor] = None
    # What the run's objectives prepared for this micro-batch in this step, by objective name
    # (training.objectives: ShifCon's contrastive targets); empty from the loader.
    objective_inputs: dict = dataclasses.field(default_factory=dict)

    _TENSORS = ("tokens", "labels", "loss_mask", "padding_mask", "priors", "prior_rows",
                "anchor_tokens", "anchor_padding_mask", "position_ids", "segment_ids",
                "anchor_position_ids", "anchor_segment_ids")

    def _map(self, fn) -> "SaraMicroBatch":
        changes = {k: fn(getattr(self, k)) for k in self._TENSORS if getattr(self, k) is not None}
        return dataclasses.replace(self, **changes)

    def pin_memory(self) -> "SaraMicroBatch":  # called by DataLoader(pin_memory=True)
        """A copy of this batch with every tensor in pinned memory."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "SaraMicroBatch":
        """A copy of this batch with every tensor on a device.

        Args:
            device: The device.
            non_blocking: Copy asynchronously (from pinned memory).
        """
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def with_priors(self, table: Optional[PriorRows]) -> "SaraMicroBatch":
        """A copy of this batch with `priors` [L_sel, B, N] gathered from `table` (the loader's
        `prior_table`) and placed beside the tokens. A batch whose priors are already there
        (the per-batch store read) or that has none comes back as it is.

        Args:
            table: The loader's `prior_table`.

        Raises:
            ValueError: No table for a batch of table rows, or another table than the batch's.
        """
        if self.priors is not None or self.prior_rows is None:
            return self
        if table is None:
            raise ValueError("this batch carries prior table rows, not priors: pass the "
                             "loader's prior_table to with_priors")
        if table.digest != self.prior_table_digest:
            raise ValueError(f"this batch's prior rows index the prior table "
                             f"{self.prior_table_digest}, not {table.digest}: use the prior_table "
                             f"of the loader the batch came from")
        priors = table.gather(self.prior_rows)
        device = self.tokens.device
        # A non-blocking copy to the host could be read before it lands; to a GPU it is ordered.
        priors = priors.to(device, non_blocking=device.type != "cpu")
        return dataclasses.replace(self, priors=priors)


def resolve_languages(shards: TokenShards, languages: Union[str, Sequence[str]]) -> list[str]:
    """The training languages a config names.

    Args:
        shards: The token shards.
        languages: "targets" (every language but the anchor), "all", a list of codes, or one
            code as a string.

    Returns:
        The codes, in order.

    Raises:
        ValueError: A language the shards do not have, or none chosen.
    """
    if languages == "targets":
        chosen = shards.target_languages
    elif languages == "all":
        chosen = shards.languages
    else:
        # One code given as a string ("hi") is one language, not the letters "h" and "i".
        chosen = [languages] if isinstance(languages, str) else list(languages)
        unknown = [lang for lang in chosen if lang not in shards.languages]
        if unknown:
            raise ValueError(f"languages {unknown} are not in {shards.root} "
                             f"(it has {shards.languages})")
    if not chosen:
        raise ValueError(f"no training languages chosen from {shards.root} ({languages!r})")
    return chosen


class SaraTrainingSamples(torch.utils.data.Dataset):
    """The samples of the training languages as one indexable list (language order, then shard
    order). Item i -> (sample, token ids, its prior), the prior being its anchor's PriorTable row
    (an int, looked up by sample id once, in `attach_prior_table`), or its stored prior row read
    by sample id beside the tokens (`attach_prior_store`), or None.

    Args:
        shards: The token shards.
        languages: The training languages (`resolve_languages`).
    """

    def __init__(self, shards: TokenShards, languages: Sequence[str]):
        self.shards = shards
        self.languages = list(languages)
        self.samples: list[ShardedSample] = [s for lang in languages for s in shards.samples(lang)]
        self.store: Optional[StoredPriors] = None
        self._selection = None
        # A list, not an array: indexing it is ~25 ns, an ndarray's int() ~110 ns per sample.
        self.prior_rows: Optional[list[int]] = None

    def attach_prior_table(self, table: PriorRows) -> None:
        """Look up every sample's prior row in a table, once.

        Args:
            table: The prior table.
        """
        self.prior_rows = table.rows(s.meta.sample_id for s in self.samples).tolist()

    def attach_prior_store(self, store: StoredPriors, layers: Optional[Sequence[int]]) -> None:
        """Read each sample's prior from a store beside its tokens.

        Args:
            store: The prior store.
            layers: Global layer numbers (None: all stored).
        """
        self.store = store
        self._selection = store.layer_selection(layers)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int
                    ) -> tuple[ShardedSample, np.ndarray, Union[int, np.ndarray, None]]:
        sample = self.samples[index]
        prior = None
        if self.prior_rows is not None:
            prior = self.prior_rows[index]
        elif self.store is not None:
            prior = self.store.stored_row(sample.meta.sample_id, self._selection)
        return sample, self.shards.tokens(sample), prior


class SaraBatchCollator:
    """DataLoader collate_fn: packs the tokens, and beside them the same samples' prior table
    rows (`prior_table_digest` given) or stacked stored priors (`store` given).

    Args:
        seq_length: S, the rows' length.
        pad_id: The padding id.
        store: The prior store read per batch, or None.
        prior_layers: The global layers of the priors' rows.
        prior_table_digest: The digest of the prior table the rows index, or None.
        anchor_rows: `anchor_rows.AnchorRows` (sample id -> its anchor's tokens), or None.

    Raises:
        ValueError: Both a store and a table digest.
    """

    def __init__(self, seq_length: int, pad_id: int, store: Optional[StoredPriors],
                 prior_layers: Sequence[int], prior_table_digest: Optional[str] = None,
                 anchor_rows=None):
        if store is not None and prior_table_digest is not None:
            raise ValueError("priors come either from a prior table or from the store")
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.store = store
        self.prior_layers = tuple(int(i) for i in prior_layers)
        self.prior_table_digest = prior_table_digest
        self.anchor_rows = anchor_rows  # AnchorRows, or None

    def __call__(self, items) -> SaraMicroBatch:
        metas = [sample.meta for sample, _, _ in items]
        packed = pack_tokens([tokens for _, tokens, _ in items], [m.prompt_length for m in metas],
                             seq_length=self.seq_length, pad_id=self.pad_id)
        priors = prior_rows = None
        if self.prior_table_digest is not None:
            # np.array then from_numpy: ~1 us a batch, torch.tensor(list) ~3 us.
            prior_rows = torch.from_numpy(np.array([row for _, _, row in items], np.int64))
        elif self.store is not None:
            priors = self.store.stack([prior for _, _, prior in items])
        anchors = None
        if self.anchor_rows is not None:
            anchors = pack_tokens([self.anchor_rows(m.sample_id) for m in metas], [0] * len(metas),
                                  seq_length=self.seq_length, pad_id=self.pad_id)
        return SaraMicroBatch(packed.tokens, packed.labels, packed.loss_mask, packed.padding_mask,
                              [m.sample_id for m in metas], [m.language for m in metas], priors,
                              self.prior_layers, prior_rows, self.prior_table_digest,
                              anchors.tokens if anchors else None,
                              anchors.padding_mask if anchors else None)


class SaraDataLoader(torch.utils.data.DataLoader):
    """torch's DataLoader of SaraMicroBatch, plus the PriorTable its batches' `prior_rows`
    index (None without priors or with the per-batch store read).

    Args:
        *args, **kwargs: torch's DataLoader's.
        prior_table: The table the batches' `prior_rows` index.
    """

    def __init__(self, *args, prior_table: Optional[PriorRows] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.prior_table = prior_table


def build_batch_loader(config: SaraDataConfig, shards: TokenShards,
                       dataset: SaraTrainingSamples, store: Optional[StoredPriors] = None,
                       prior_layers: Sequence[int] = (), table: Optional[PriorRows] = None,
                       dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0,
                       num_workers: int = 0, pin_memory: bool = False) -> SaraDataLoader:
    """This data-parallel rank's micro-batches of `dataset`, one sample per row, from
    `consumed_samples` on (global count), its priors already attached
    (`priors.loader.build_sara_data_loader`): batches carry rows of `table` or the `store`'s rows
    of `prior_layers`, or no priors. The packed form is `data.packed_loader`'s.

    Args:
        config: The data config (batch size, epochs, seed, shuffle, anchor rows, ...).
        shards: The token shards.
        dataset: The training samples, priors attached.
        store: The prior store read per batch, or None.
        prior_layers: The global layers of the priors' rows.
        table: The prior table the batches index, or None.
        dp_rank, dp_size: This data-parallel rank and the number of ranks.
        consumed_samples: Samples of the whole run already taken (a resume starts after them).
        num_workers: DataLoader worker processes.
        pin_memory: Pin the batches' memory.

    Returns:
        The `SaraDataLoader`.
    """
    order = GlobalSampleOrder(len(dataset), config.seed, config.shuffle)
    sampler = RankMicroBatchSampler(order, config.epochs * len(dataset), config.micro_batch_size,
                                    dp_rank, dp_size, consumed_samples)
    anchor_rows = None
    if config.anchor_rows:
        from sara_megatron.data.anchor_rows import anchor_rows_for

        anchor_rows = anchor_rows_for(shards, (s.meta.sample_id for s in dataset.samples))
    collate = SaraBatchCollator(config.seq_length or shards.seq_length, config.pad_id, store,
                                prior_layers, table.digest if table is not None else None,
                                anchor_rows)
    return SaraDataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                          num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=num_workers > 0, prior_table=table)
