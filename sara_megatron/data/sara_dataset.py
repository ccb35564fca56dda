"""The SARA training data: token micro-batches with the anchor priors of exactly their samples.

    loader = build_sara_data_loader(SaraDataConfig(shards_dir=..., prior_store=...,
                                                   prior_layers=range(7, 35), micro_batch_size=4),
                                    dp_rank, dp_size, consumed_samples=resume_from)
    for batch in loader:   # SaraMicroBatch
        batch.tokens, batch.labels, batch.loss_mask, batch.padding_mask  # [B, S]
        batch.sample_ids                                                 # B ids
        batch.priors                                                     # [L_sel, B, N] fp32

A target-language sample is trained against the prior of its anchor (same sample id); when the
anchors themselves train too (`languages="all"`), against their own prior. Priors are looked up by
sample id, never by position, and the prior store must cover every training sample, come from the
anchor shards of this corpus and (if given) from the expected model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np
import torch

from sara_megatron.data.batch import pack_tokens
from sara_megatron.data.sample_order import GlobalSampleOrder, RankMicroBatchSampler
from sara_megatron.data.token_shards import ShardedSample, TokenShards
from sara_megatron.priors.store import PriorStore
from sara_megatron.priors.store_format import MissingPriorError, PriorStoreError


@dataclasses.dataclass(frozen=True)
class SaraDataConfig:
    shards_dir: str
    prior_store: Optional[str] = None  # None: no priors (plain fine-tuning)
    prior_layers: Optional[Sequence[int]] = None  # global layers for the JS loss; None: all stored
    # "targets": every non-anchor language of the shards; "all": anchors too; or explicit codes.
    languages: Union[str, Sequence[str]] = "targets"
    seq_length: Optional[int] = None  # None: the shards' (longer samples are cut)
    micro_batch_size: int = 1
    epochs: int = 1
    seed: int = 1234
    shuffle: bool = True
    pad_id: int = 0
    expected_model_fingerprint: Optional[str] = None
    verify_prior_store: str = "open"  # "open" | "lazy"


@dataclasses.dataclass
class SaraMicroBatch:
    tokens: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64: next token
    loss_mask: torch.Tensor  # [B, S] float32: 1 where the label is a response token
    padding_mask: torch.Tensor  # [B, S] bool: True = padding (Megatron's convention)
    sample_ids: list[str]
    languages: list[str]
    priors: Optional[torch.Tensor]  # [L_sel, B, N] float32, row b = sample_ids[b]'s anchor prior
    prior_layers: tuple[int, ...]  # the global layer of each of the L_sel rows

    _TENSORS = ("tokens", "labels", "loss_mask", "padding_mask", "priors")

    def _map(self, fn) -> "SaraMicroBatch":
        changes = {k: fn(getattr(self, k)) for k in self._TENSORS if getattr(self, k) is not None}
        return dataclasses.replace(self, **changes)

    def pin_memory(self) -> "SaraMicroBatch":  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "SaraMicroBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def resolve_languages(shards: TokenShards, languages: Union[str, Sequence[str]]) -> list[str]:
    if languages == "targets":
        chosen = shards.target_languages
    elif languages == "all":
        chosen = shards.languages
    else:
        chosen = list(languages)
        unknown = [lang for lang in chosen if lang not in shards.languages]
        if unknown:
            raise ValueError(f"languages {unknown} are not in {shards.root} "
                             f"(it has {shards.languages})")
    if not chosen:
        raise ValueError(f"no training languages chosen from {shards.root} ({languages!r})")
    return chosen


class SaraTrainingSamples(torch.utils.data.Dataset):
    """The samples of the training languages as one indexable list (language order, then shard
    order). Item i -> (sample, token ids, its stored prior row or None), the prior read beside
    the tokens, by sample id."""

    def __init__(self, shards: TokenShards, languages: Sequence[str]):
        self.shards = shards
        self.languages = list(languages)
        self.samples: list[ShardedSample] = [s for lang in languages for s in shards.samples(lang)]
        self.store: Optional[PriorStore] = None
        self._selection = None

    def attach_priors(self, store: PriorStore, layers: Optional[Sequence[int]]) -> None:
        self.store = store
        self._selection = store.layer_selection(layers)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[ShardedSample, np.ndarray, Optional[np.ndarray]]:
        sample = self.samples[index]
        prior = None
        if self.store is not None:
            prior = self.store.stored_row(sample.meta.sample_id, self._selection)
        return sample, self.shards.tokens(sample), prior


def open_prior_store(config: SaraDataConfig, shards: TokenShards,
                     sample_ids: Sequence[str]) -> PriorStore:
    """The prior store, checked against this corpus and model; it must cover every sample."""
    store = PriorStore(
        config.prior_store,
        expected_model_fingerprint=config.expected_model_fingerprint,
        expected_corpus_fingerprint=shards.language_fingerprint(shards.anchor_language),
        verify=config.verify_prior_store,
    )
    if store.metadata.anchor_language != shards.anchor_language:
        raise PriorStoreError(f"prior store {store.path} holds {store.metadata.anchor_language!r} "
                              f"anchors, the shards anchor on {shards.anchor_language!r}")
    missing = store.missing(dict.fromkeys(sample_ids))
    if missing:
        raise MissingPriorError(
            f"{len(missing)} training sample id(s) have no prior in {store.path}, e.g. "
            f"{missing[:5]}: re-run tools/extract_priors.py on these shards"
        )
    return store


class SaraBatchCollator:
    """DataLoader collate_fn: packs the tokens and stacks the priors of the same samples."""

    def __init__(self, seq_length: int, pad_id: int, store: Optional[PriorStore],
                 prior_layers: Sequence[int]):
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.store = store
        self.prior_layers = tuple(int(i) for i in prior_layers)

    def __call__(self, items) -> SaraMicroBatch:
        metas = [sample.meta for sample, _, _ in items]
        packed = pack_tokens([tokens for _, tokens, _ in items], [m.prompt_length for m in metas],
                             seq_length=self.seq_length, pad_id=self.pad_id)
        priors = None
        if self.store is not None:
            priors = self.store.stack([prior for _, _, prior in items])
        return SaraMicroBatch(packed.tokens, packed.labels, packed.loss_mask, packed.padding_mask,
                              [m.sample_id for m in metas], [m.language for m in metas], priors,
                              self.prior_layers)


def build_sara_data_loader(config: SaraDataConfig, dp_rank: int = 0, dp_size: int = 1,
                           consumed_samples: int = 0, num_workers: int = 0,
                           pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """This data-parallel rank's micro-batches, from `consumed_samples` on (global count)."""
    shards = TokenShards(config.shards_dir)
    dataset = SaraTrainingSamples(shards, resolve_languages(shards, config.languages))
    store, prior_layers = None, ()
    if config.prior_store is not None:
        store = open_prior_store(config, shards, [s.meta.sample_id for s in dataset.samples])
        prior_layers = store.layers if config.prior_layers is None else config.prior_layers
        dataset.attach_priors(store, prior_layers)  # raises naming layers that were not stored
    elif config.prior_layers is not None:
        raise ValueError("prior_layers given without a prior_store")
    order = GlobalSampleOrder(len(dataset), config.seed, config.shuffle)
    sampler = RankMicroBatchSampler(order, config.epochs * len(dataset), config.micro_batch_size,
                                    dp_rank, dp_size, consumed_samples)
    collate = SaraBatchCollator(config.seq_length or shards.seq_length, config.pad_id, store,
                                prior_layers)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=num_workers > 0)
