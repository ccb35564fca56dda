"""The SARA training loader: the token micro-batches of `data.sara_dataset`, joined with the
anchor priors of exactly their samples from the prior store (see that module for how they
travel: a `PriorTable` whose rows batches carry, or a per-batch read of the store).

    loader = build_sara_data_loader(SaraDataConfig(shards_dir=..., prior_store=..., ...),
                                    dp_rank, dp_size, consumed_samples, prior_device="cuda")
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from sara_megatron.data.packed_loader import build_packed_batch_loader
from sara_megatron.data.sara_dataset import (
    SaraDataConfig,
    SaraDataLoader,
    SaraTrainingSamples,
    build_batch_loader,
    resolve_languages,
)
from sara_megatron.data.token_shards import TokenShards
from sara_megatron.priors.store import PriorStore, read_prior_store_metadata
from sara_megatron.priors.store_format import MissingPriorError, PriorStoreError
from sara_megatron.priors.table import PriorTable


def open_prior_store(config: SaraDataConfig, shards: TokenShards,
                     sample_ids: Sequence[str]) -> PriorStore:
    """The prior store, checked against this corpus and model; it must cover every sample.

    Args:
        config: the data config (`prior_store`, `expected_model_fingerprint`,
            `verify_prior_store`).
        shards: the token shards (their anchor language and its corpus fingerprint).
        sample_ids: the training samples' ids.

    Raises:
        PriorStoreError: priors of another anchor language, corpus or model, or a store that
            does not read.
        MissingPriorError: a training sample with no prior in the store.
    """
    # The anchor language first: an en store for zh-anchored shards (or the reverse) is named as
    # such, not as a corpus fingerprint mismatch.
    stored_anchor = read_prior_store_metadata(config.prior_store).anchor_language
    if stored_anchor != shards.anchor_language:
        raise PriorStoreError(f"prior store {config.prior_store} holds {stored_anchor!r}-anchored "
                              f"priors, the shards anchor on {shards.anchor_language!r}: extract "
                              f"priors from these shards' {shards.anchor_language} anchors")
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


def build_sara_data_loader(config: SaraDataConfig, dp_rank: int = 0, dp_size: int = 1,
                           consumed_samples: int = 0, num_workers: int = 0,
                           pin_memory: bool = False,
                           prior_device: Union[torch.device, str, None] = None,
                           global_batch_size: Optional[int] = None,
                           ) -> SaraDataLoader:
    """This data-parallel rank's micro-batches, from `consumed_samples` on (global count), with
    the anchor priors of their samples. With `config.packing`, the packed micro-batches of each
    global batch of `global_batch_size` samples (see data/packed_loader.py).
    With priors and `config.prior_table`, `loader.prior_table` holds them on `prior_device`
    (None: CPU); fill a batch's priors with `batch.with_priors(loader.prior_table)`.

    Args:
        config: the data config (shards, languages, prior store and layers, packing, ...).
        dp_rank, dp_size: this rank's place in the data-parallel group.
        consumed_samples: global samples already trained on (where a resume starts).
        num_workers: torch DataLoader worker processes.
        pin_memory: pin the batches' host memory.
        prior_device: where the prior table lives; None: CPU.
        global_batch_size: samples per global batch (packing groups each one's samples).

    Returns:
        The `SaraDataLoader`.

    Raises:
        ValueError: `prior_layers` without a prior store, or layers the store does not hold.
        PriorStoreError, MissingPriorError: as `open_prior_store`.
    """
    shards = TokenShards(config.shards_dir, verify=config.verify_shards)
    dataset = SaraTrainingSamples(shards, resolve_languages(shards, config.languages))
    store, prior_layers, table = None, (), None
    if config.prior_store is not None:
        store = open_prior_store(config, shards, [s.meta.sample_id for s in dataset.samples])
        prior_layers = tuple(store.layers if config.prior_layers is None
                             else (int(layer) for layer in config.prior_layers))
        if config.prior_table:
            # raises naming layers that were not stored
            table = PriorTable.from_store(store, (s.meta.sample_id for s in dataset.samples),
                                          prior_layers)
            dataset.attach_prior_table(table)
            if prior_device is not None:
                table = table.to(prior_device)
            store = None  # the table holds all the loader needs; batches carry rows only
        else:
            dataset.attach_prior_store(store, prior_layers)  # raises naming unstored layers
    elif config.prior_layers is not None:
        raise ValueError("prior_layers given without a prior_store")
    if config.packing:
        return build_packed_batch_loader(config, shards, dataset, store, prior_layers, table,
                                         dp_rank, dp_size, consumed_samples, num_workers,
                                         pin_memory, global_batch_size)
    return build_batch_loader(config, shards, dataset, store, prior_layers, table, dp_rank,
                              dp_size, consumed_samples, num_workers, pin_memory)
