"""Prior extraction: equal to a direct recomputation from router weights on each sample alone;
resumable after an interruption; the same store at DP=2, EP=2, PP=2 and TP=2 as on one rank."""

import json

import pytest
import torch

from sara_megatron.checkpointing import save_model_weights
from sara_megatron.data.corpus_sharding import ShardingConfig, shard_corpus
from sara_megatron.data.local_tokenizer import build_local_tokenizer
from sara_megatron.data.synthetic_corpus import corpus_texts, write_synthetic_corpus
from sara_megatron.data.token_shards import TokenShards
from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model, causal_attention_mask
from sara_megatron.priors import (
    PriorStore,
    PriorStoreError,
    PriorStoreMetadata,
    PriorStoreWriter,
    model_fingerprint,
)
from sara_megatron.priors.extraction import ExtractionSettings, extract_priors

NUM_SAMPLES = 11  # not a multiple of the micro-batch size: the last batch is short


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract_inputs")
    paths = write_synthetic_corpus(root / "corpus", NUM_SAMPLES, languages=("en", "hi"))
    build_local_tokenizer(corpus_texts(paths), root / "tokenizer")
    shard_corpus(ShardingConfig((str(root / "corpus"),), str(root / "shards"),
                                str(root / "tokenizer"), seq_length=128, shard_size=4))
    return root / "shards"


def make_model(preset, ckpt):
    torch.manual_seed(0)
    model = build_model(get_preset(preset))
    save_model_weights(model, ckpt)
    return model.eval()


def metadata(preset, ckpt, shards, layers):
    return PriorStoreMetadata(layers=tuple(layers), num_experts=get_preset(preset).num_experts,
                              dtype="fp32", anchor_language="en",
                              model_fingerprint=model_fingerprint(ckpt),
                              corpus_fingerprint=shards.language_fingerprint("en"))


def extract(model, shards, path, meta, progress=None, mbs=3, packing=True):
    settings = ExtractionSettings(layers=meta.layers, micro_batch_size=mbs, flush_every=3,
                                  packing=packing)
    return extract_priors(model, shards, PriorStoreWriter(path, meta), settings, progress)


@torch.no_grad()
def recompute_alone(model, tokens, layers, padded_length=None):
    """Each layer's mean over all tokens of softmax(h · W_gᵀ), from the router's own input,
    in float64, for one sequence run on its own (no batching), unpadded or padded at the end to
    `padded_length` as training pads it (which decides Phi's longrope factors)."""
    inputs = {}
    hooks = [model.decoder.layers[i].mlp.register_forward_pre_hook(
        lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach())) for i in layers]
    try:
        n = len(tokens)
        s = padded_length or n
        t = torch.zeros(1, s, dtype=torch.long)
        t[0, :n] = torch.as_tensor(tokens, dtype=torch.long)
        model(t, torch.arange(s)[None], causal_attention_mask(s))
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i in layers:
        weight = model.decoder.layers[i].mlp.router.weight.double()
        hidden = inputs[i].double().reshape(s, -1)[:n]  # [S, 1, H] (Megatron's layout): B = 1
        out.append(torch.softmax(hidden @ weight.T, dim=-1).mean(0))
    return torch.stack(out)


@pytest.fixture(scope="module")
def qwen(single_rank, shards_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_priors")
    model = make_model("qwen3_moe_tiny", root / "ckpt")
    shards = TokenShards(shards_dir)
    meta = metadata("qwen3_moe_tiny", root / "ckpt", shards, range(4))
    extract(model, shards, root / "store", meta)
    return model, root


@pytest.mark.parametrize("preset", ["qwen3_moe_tiny", "phi35_moe_tiny"])
def test_priors_equal_direct_recomputation(single_rank, shards_dir, qwen, tmp_path, preset):
    shards = TokenShards(shards_dir)
    if preset == "qwen3_moe_tiny":  # extracted by the module fixture, all layers
        model, root = qwen
        layers, padded_length = (0, 1, 2, 3), None  # no rope regime: alone, unpadded
    else:
        model, root, layers = make_model(preset, tmp_path / "ckpt"), tmp_path, (1, 3)
        # Rows of 128 are past the tiny Phi's longrope switch (64): priors under the long factors.
        padded_length = shards.seq_length
        extract(model, shards, root / "store", metadata(preset, root / "ckpt", shards, layers))
    store = PriorStore(root / "store", expected_model_fingerprint=model_fingerprint(root / "ckpt"))
    anchors = shards.samples("en")
    assert len(store) == NUM_SAMPLES and store.layers == layers
    lengths = {s.meta.token_count for s in anchors}
    assert len(lengths) > 1  # batches really were padded
    for sample in anchors:
        want = recompute_alone(model, shards.tokens(sample), layers, padded_length)
        got = store[sample.meta.sample_id].double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.sum(-1), torch.ones(len(layers), dtype=torch.float64))


def test_packed_extraction_equals_unpacked(single_rank, shards_dir, qwen, tmp_path):
    """Packing several anchors per row gives every sample the prior of its unpadded extraction,
    with fewer rows' worth of padding."""
    model, root = qwen  # the module fixture extracted packed (the default)
    shards = TokenShards(shards_dir)
    meta = metadata("qwen3_moe_tiny", root / "ckpt", shards, range(4))
    unpacked = extract(model, shards, tmp_path / "unpacked", meta, packing=False)
    packed = extract(model, shards, tmp_path / "packed", meta, packing=True)
    assert packed["tokens"] == unpacked["tokens"]
    assert packed["fill_rate"] > unpacked["fill_rate"]
    a, b = PriorStore(tmp_path / "packed"), PriorStore(tmp_path / "unpacked")
    # The same samples (written in row order, so shards group them differently), same values.
    ids = sorted(b.sample_ids)
    assert sorted(a.sample_ids) == ids and len(ids) == NUM_SAMPLES and a.metadata == b.metadata
    torch.testing.assert_close(a.read(ids), b.read(ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(PriorStore(root / "store").read(ids), a.read(ids), rtol=0,
                               atol=1e-7)


class Killed(Exception):
    pass


def test_rerun_after_interruption_skips_finished_samples(single_rank, shards_dir, qwen, tmp_path):
    model, root = qwen
    shards = TokenShards(shards_dir)
    meta = metadata("qwen3_moe_tiny", root / "ckpt", shards, range(4))

    def kill_after_six(progress):
        if progress.samples_done == 6:
            raise Killed

    with pytest.raises(Killed):
        extract(model, shards, tmp_path / "store", meta, kill_after_six)
    with pytest.raises(PriorStoreError, match="incomplete"):
        PriorStore(tmp_path / "store")
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "shards").iterdir()}
    assert len(kept) == 4  # two shards of three samples
    result = extract(model, shards, tmp_path / "store", meta)
    assert (result["samples_resumed"], result["samples_extracted"]) == (6, NUM_SAMPLES - 6)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    full, resumed = PriorStore(root / "store"), PriorStore(tmp_path / "store")
    ids = full.sample_ids
    torch.testing.assert_close(resumed.read(ids), full.read(ids), rtol=1e-6, atol=1e-7)
    # A store is only resumed by the same model / layers / corpus.
    other = PriorStoreMetadata(**dict(meta.__dict__, layers=(1, 2)))
    with pytest.raises(PriorStoreError, match=r"layers: \(0, 1, 2, 3\) vs \(1, 2\)"):
        extract(model, shards, tmp_path / "store", other)


def test_layouts_equal_single_rank(torchrun, shards_dir, qwen, tmp_path):
    _, root = qwen
    torchrun("tests/workers/priors_layouts.py", "--shards", str(shards_dir),
             "--ckpt", str(root / "ckpt"), "--out-root", str(tmp_path), timeout=600)
    reference = PriorStore(root / "store")
    ids = reference.sample_ids
    for layout in ("dp2", "ep2", "pp2", "tp2", "ep2_resumed"):
        store = PriorStore(tmp_path / layout,
                           expected_model_fingerprint=reference.metadata.model_fingerprint)
        assert store.metadata == reference.metadata, layout
        assert sorted(store.sample_ids) == sorted(ids), layout
        torch.testing.assert_close(store.read(ids), reference.read(ids), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, layout=layout: f"{layout}: {m}")
    resume = json.loads((tmp_path / "resume.json").read_text())
    assert resume["samples_resumed"] > 0 and resume["samples_extracted"] > 0
    assert resume["samples_resumed"] + resume["samples_extracted"] == NUM_SAMPLES


def test_longrope_prior_does_not_depend_on_its_batch(single_rank, tmp_path):
    # The tiny Phi switches to the long rope factors past 64 padded positions; shards of
    # seq_length 128 are trained past the switch, so every prior must be extracted past it too —
    # a short anchor padded only to its own length (alone in its step) would use the short ones.
    paths = write_synthetic_corpus(tmp_path / "corpus", 6, languages=("en",), max_words=80)
    build_local_tokenizer(corpus_texts(paths), tmp_path / "tokenizer")
    shard_corpus(ShardingConfig((str(tmp_path / "corpus"),), str(tmp_path / "shards"),
                                str(tmp_path / "tokenizer"), seq_length=128, shard_size=6))
    shards = TokenShards(tmp_path / "shards")
    switch = get_preset("phi35_moe_tiny").longrope.original_max_position_embeddings
    short = min(shards.samples("en"), key=lambda s: s.meta.token_count)
    assert short.meta.token_count <= switch < max(s.meta.token_count for s in shards.samples("en"))
    model, layers = make_model("phi35_moe_tiny", tmp_path / "ckpt"), (1, 3)
    meta = metadata("phi35_moe_tiny", tmp_path / "ckpt", shards, layers)
    extract(model, shards, tmp_path / "alone", meta, mbs=1)  # each sample a step of its own
    extract(model, shards, tmp_path / "together", meta, mbs=6)  # all in one step
    sid, tokens = short.meta.sample_id, shards.tokens(short)
    alone, together = PriorStore(tmp_path / "alone")[sid], PriorStore(tmp_path / "together")[sid]
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-7)
    as_trained = recompute_alone(model, tokens, layers, padded_length=shards.seq_length)
    torch.testing.assert_close(together.double(), as_trained, rtol=1e-5, atol=1e-7)
    # The short factors would give another prior (what extraction stored before padding past
    # the switch): the check above can tell the two apart.
    short_rope = recompute_alone(model, tokens, layers)
    assert (together.double() - short_rope).abs().max() > 1e-6


def test_extraction_job_needs_a_nameable_model(tmp_path):
    """tools/extract_priors.py's model: --model, else the config.json the converter kept beside
    the checkpoint; a checkpoint with neither is a user error (one line, exit 2), found before
    any process group starts."""
    from sara_megatron.launch import user_error_message
    from sara_megatron.priors.extraction_job import (
        ExtractionInputError, ExtractionJob, job_architecture,
    )

    job = ExtractionJob(shards=str(tmp_path), checkpoint=str(tmp_path), output=str(tmp_path / "p"))
    with pytest.raises(ExtractionInputError, match="name the model with --model") as refused:
        job_architecture(job)
    assert user_error_message(refused.value) == str(refused.value)
    named = ExtractionJob(shards=str(tmp_path), checkpoint=str(tmp_path),
                          output=str(tmp_path / "p"), model="qwen3_moe_tiny")
    assert job_architecture(named) == get_preset("qwen3_moe_tiny")
