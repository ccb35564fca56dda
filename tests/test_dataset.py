"""The SARA training data loader: every batch's priors are its own samples' anchor priors (through
the loader's PriorTable, and through the per-batch store read); token packing and masks;
deterministic, disjoint across data-parallel ranks, resumable; language choice; refusals (missing
prior, other model, other corpus, another loader's prior table)."""

import hashlib

import numpy as np
import pytest
import torch

from sara_megatron.data.corpus_sharding import ShardingConfig, shard_corpus
from sara_megatron.data.local_tokenizer import build_local_tokenizer
from sara_megatron.data.sara_dataset import SaraDataConfig
from sara_megatron.data.synthetic_corpus import corpus_texts, write_synthetic_corpus
from sara_megatron.data.token_shards import TokenShards
from sara_megatron.priors import (
    MissingPriorError,
    PriorStoreError,
    PriorStoreMetadata,
    PriorStoreWriter,
)
from sara_megatron.priors.loader import build_sara_data_loader

N, LAYERS, EXPERTS, SEQ = 10, (0, 1, 2, 3), 8, 64


def prior_of(sample_id):
    """A distinct, recognisable [L, N] prior per sample id."""
    seed = int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    p = rng.random((len(LAYERS), EXPERTS)).astype(np.float32) + 0.01
    return p / p.sum(-1, keepdims=True)


def write_priors(path, shards, ids, model="model-a", corpus=None):
    meta = PriorStoreMetadata(LAYERS, EXPERTS, "fp32", "en", model,
                              corpus or shards.language_fingerprint("en"))
    writer = PriorStoreWriter(path, meta)
    writer.prepare()
    for start in range(0, len(ids), 3):
        chunk = ids[start:start + 3]
        writer.write_shard(chunk, np.stack([prior_of(s) for s in chunk]))
    writer.finalize(ids)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    paths = write_synthetic_corpus(root / "corpus", N, languages=("en", "hi", "sw"))
    build_local_tokenizer(corpus_texts(paths), root / "tokenizer")
    shard_corpus(ShardingConfig((str(root / "corpus"),), str(root / "shards"),
                                str(root / "tokenizer"), seq_length=SEQ, shard_size=4))
    shards = TokenShards(root / "shards")
    ids = [s.meta.sample_id for s in shards.samples("en")]
    store = write_priors(root / "priors", shards, ids)
    return root, shards, store


def config(data, **overrides):
    root, _, store = data
    settings = dict(shards_dir=str(root / "shards"), prior_store=store, micro_batch_size=3,
                    prior_layers=(1, 3), expected_model_fingerprint="model-a")
    settings.update(overrides)
    return SaraDataConfig(**settings)


def batches(cfg, dp_rank=0, dp_size=1, consumed=0, **kwargs):
    """The loader's batches with their priors in place, as the training loop gets them."""
    loader = build_sara_data_loader(cfg, dp_rank, dp_size, consumed, **kwargs)
    return [batch.with_priors(loader.prior_table) for batch in loader]


@pytest.mark.parametrize("prior_table", [True, False], ids=["table", "store-per-batch"])
def test_every_batch_priors_belong_to_its_samples(data, prior_table):
    seen = []
    for rank in range(2):
        cfg = config(data, languages="all", epochs=2, prior_table=prior_table)
        loader = build_sara_data_loader(cfg, rank, 2)
        table = loader.prior_table
        for batch in loader:
            if prior_table:
                # The loader hands out table rows, not priors; the rows name the batch's samples.
                assert batch.priors is None and batch.prior_rows.dtype == torch.int64
                assert table.sample_ids_at(batch.prior_rows) == batch.sample_ids
                assert batch.prior_table_digest == table.digest
            else:
                assert table is None and batch.prior_rows is None
            batch = batch.with_priors(table)
            assert batch.priors.shape == (2, 3, EXPERTS) and batch.prior_layers == (1, 3)
            for b, sid in enumerate(batch.sample_ids):
                want = torch.from_numpy(prior_of(sid)[[1, 3]])
                assert torch.equal(batch.priors[:, b], want), (sid, b)
            seen += list(zip(batch.sample_ids, batch.languages))
    # The anchors train too with languages="all"; two epochs of 30 samples, 6 per step.
    assert len(seen) == 60 and {lang for _, lang in seen} == {"en", "hi", "sw"}


def test_prior_table(data):
    loader = build_sara_data_loader(config(data))
    table = loader.prior_table
    # One row per distinct anchor id, the selected layers only: 10 x 2 x 8 fp32.
    assert len(table) == N and table.layers == (1, 3) and table.device == torch.device("cpu")
    assert table.priors.shape == (2, N, EXPERTS) and table.nbytes == N * 2 * EXPERTS * 4
    batch = next(iter(loader))
    # `to` moves the rows too; priors come out beside the tokens, wherever the table is.
    moved = batch.to("cpu").with_priors(table.to("cpu"))
    assert torch.equal(moved.priors, table.gather(batch.prior_rows))
    assert batch.with_priors(table).priors.is_contiguous()
    with pytest.raises(ValueError, match="pass the loader's prior_table"):
        batch.with_priors(None)
    # Rows index one loader's table: another table (other layers) is refused, not misread.
    other = build_sara_data_loader(config(data, prior_layers=(0, 1))).prior_table
    with pytest.raises(ValueError, match="use the prior_table of the loader the batch came"):
        batch.with_priors(other)
    assert build_sara_data_loader(config(data, prior_table=False)).prior_table is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_prior_table_on_gpu(data):
    cfg = config(data, languages="all")
    loader = build_sara_data_loader(cfg, prior_device="cuda", pin_memory=True)
    assert loader.prior_table.device.type == "cuda"
    for host, batch in zip(batches(cfg), loader):
        batch = batch.to("cuda", non_blocking=True).with_priors(loader.prior_table)
        assert batch.priors.device.type == "cuda" and batch.prior_rows.device.type == "cuda"
        assert torch.equal(batch.priors.cpu(), host.priors)


def test_tokens_labels_and_masks(data):
    _, shards, _ = data
    metas = {(s.meta.sample_id, s.meta.language): s for lang in ("hi", "sw")
             for s in shards.samples(lang)}
    for batch in batches(config(data)):
        assert batch.tokens.shape == batch.labels.shape == (3, SEQ)
        for b, key in enumerate(zip(batch.sample_ids, batch.languages)):
            sample = metas[key]
            tokens = torch.from_numpy(shards.tokens(sample).astype(np.int64))
            n, prompt = len(tokens), sample.meta.prompt_length
            assert torch.equal(batch.tokens[b, :n], tokens)
            assert torch.equal(batch.padding_mask[b], torch.arange(SEQ) >= n)
            assert torch.equal(batch.labels[b, :n - 1], tokens[1:])
            # The loss predicts exactly the response tokens.
            predicted = batch.labels[b][batch.loss_mask[b].bool()]
            assert torch.equal(predicted, tokens[prompt:])


def test_deterministic_and_resumable(data):
    cfg = config(data, epochs=3)
    first = batches(cfg, 1, 2)
    assert [b.sample_ids for b in first] == [b.sample_ids for b in batches(cfg, 1, 2)]
    assert [b.sample_ids for b in first] != [b.sample_ids for b in batches(
        config(data, epochs=3, seed=7), 1, 2)]
    # Resuming from a consumed-samples count continues the same stream on every rank.
    resumed = batches(cfg, 1, 2, consumed=4 * 6)
    assert [b.sample_ids for b in resumed] == [b.sample_ids for b in first[4:]]
    assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.priors, b.priors)
               for a, b in zip(resumed, first[4:]))
    with pytest.raises(ValueError, match="not a multiple"):
        batches(cfg, 0, 2, consumed=5)


def test_split_across_data_parallel_ranks(data):
    # 20 target samples: 3 steps of 2 ranks x 3 per epoch; the last incomplete step is dropped.
    ranks = [batches(config(data), r, 2) for r in range(2)]
    single = batches(config(data, micro_batch_size=6))  # same global batches on one rank
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 3
    for step, whole in enumerate(single):
        keys = [(s, lang) for r in range(2)
                for s, lang in zip(ranks[r][step].sample_ids, ranks[r][step].languages)]
        assert keys == list(zip(whole.sample_ids, whole.languages))
    everything = [k for b in single for k in zip(b.sample_ids, b.languages)]
    assert len(set(everything)) == len(everything) == 18  # disjoint within the epoch


def test_language_choice(data):
    def languages(**kw):
        return {lang for b in batches(config(data, **kw)) for lang in b.languages}

    assert languages() == {"hi", "sw"}  # targets only by default
    assert languages(languages="all") == {"en", "hi", "sw"}
    assert languages(languages=["sw"]) == {"sw"}
    assert languages(languages="hi") == {"hi"}  # one code as a string, not its letters
    with pytest.raises(ValueError, match=r"languages \['te'\] are not in"):
        batches(config(data, languages=["te"]))
    with pytest.raises(ValueError, match=r"languages \['te'\] are not in"):
        batches(config(data, languages="te"))


def test_without_priors(data):
    loader = build_sara_data_loader(config(data, prior_store=None, prior_layers=None))
    batch = next(iter(loader))
    assert loader.prior_table is None and batch.with_priors(loader.prior_table) is batch
    assert batch.priors is None and batch.prior_rows is None and batch.prior_layers == ()


def test_refusals(data, tmp_path):
    root, shards, _ = data
    ids = [s.meta.sample_id for s in shards.samples("en")]
    partial = write_priors(tmp_path / "partial", shards, ids[:-1])
    for prior_table in (True, False):  # at open, before any table is built
        with pytest.raises(MissingPriorError, match=rf"1 training sample id\(s\).*'{ids[-1]}'"):
            batches(config(data, prior_store=partial, prior_table=prior_table))
    with pytest.raises(PriorStoreError, match="different model"):
        batches(config(data, expected_model_fingerprint="model-b"))
    stale = write_priors(tmp_path / "stale", shards, ids, corpus="sha256:other")
    with pytest.raises(PriorStoreError, match="different corpus"):
        batches(config(data, prior_store=stale))
    for prior_table in (True, False):
        with pytest.raises(PriorStoreError, match=r"layers \[5\] were not recorded"):
            batches(config(data, prior_layers=(1, 5), prior_table=prior_table))


@pytest.mark.parametrize("prior_table", [True, False], ids=["table", "store-per-batch"])
def test_loader_workers(data, prior_table):
    cfg = config(data, languages="all", prior_table=prior_table)
    plain = batches(cfg, 0, 2)
    threaded = batches(cfg, 0, 2, num_workers=1)
    assert [b.sample_ids for b in threaded] == [b.sample_ids for b in plain]
    assert all(torch.equal(a.priors, b.priors) for a, b in zip(plain, threaded))
