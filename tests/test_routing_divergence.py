"""The per-layer routing divergence analysis: a sample's result does not depend on which samples
share its batch (Phi-3 longrope switches factors with the padded length), the model's mode is
restored, and a batch size below 1 or the anchor named as a target is refused."""

import pytest
import torch

from sara_megatron.analysis import routing_divergence
from sara_megatron.data.corpus_sharding import ShardingConfig, shard_corpus
from sara_megatron.data.local_tokenizer import build_local_tokenizer
from sara_megatron.data.synthetic_corpus import corpus_texts, write_synthetic_corpus
from sara_megatron.data.token_shards import TokenShards
from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model


@pytest.fixture(scope="module")
def phi_shards(tmp_path_factory):
    # Shards of seq_length 128 train past the tiny Phi's longrope switch at 64 positions, and hold
    # samples on both sides of it.
    root = tmp_path_factory.mktemp("divergence_inputs")
    paths = write_synthetic_corpus(root / "corpus", 6, languages=("en", "hi"), max_words=80)
    build_local_tokenizer(corpus_texts(paths), root / "tokenizer")
    shard_corpus(ShardingConfig((str(root / "corpus"),), str(root / "shards"),
                                str(root / "tokenizer"), seq_length=128, shard_size=6))
    return TokenShards(root / "shards")


def test_longrope_divergence_does_not_depend_on_batch_mates(single_rank, phi_shards):
    switch = get_preset("phi35_moe_tiny").longrope.original_max_position_embeddings
    counts = [s.meta.token_count for lang in ("en", "hi") for s in phi_shards.samples(lang)]
    assert min(counts) <= switch < max(counts)
    torch.manual_seed(0)
    model = build_model(get_preset("phi35_moe_tiny"))
    with torch.no_grad():  # sharper attention than a fresh init, as in a trained model
        for name, parameter in model.named_parameters():
            if "linear_qkv.weight" in name:
                parameter.mul_(8)
    layers = [0, 1, 2, 3]
    alone = routing_divergence(model, phi_shards, layers, batch_size=1)
    together = routing_divergence(model, phi_shards, layers, batch_size=6)
    # Before batches were padded by training's rope regime, a short sample alone ran under the
    # short factors and beside a long one under the long factors (up to 6e-6 apart here).
    torch.testing.assert_close(torch.tensor(alone["hi"]), torch.tensor(together["hi"]),
                               rtol=0, atol=1e-9)
    assert min(alone["hi"]) > 0


def test_mode_restored_and_batch_size_checked(single_rank, phi_shards):
    model = build_model(get_preset("phi35_moe_tiny"))
    model.train()
    routing_divergence(model, phi_shards, [1], batch_size=4)
    assert model.training  # eval would switch off the sparsemixer's sampling and megatron's LB
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        routing_divergence(model, phi_shards, [1], batch_size=0)
    with pytest.raises(ValueError, match="'en' is the anchor language.*name target languages "
                                         r"\(hi\)"):
        routing_divergence(model, phi_shards, [1], languages=["en"])


def test_batches_hold_sequences_of_like_length(single_rank, phi_shards, monkeypatch):
    """Batches are cut from the sequences sorted longest first, so a short sequence is not padded
    to a long batch-mate's length; the result is the same as one sequence per batch."""
    import importlib

    # The package exports a function of the module's name: fetch the module itself.
    module = importlib.import_module("sara_megatron.analysis.routing_divergence")

    padded = []
    real_lay_out = module.lay_out_rows

    def recording_lay_out(rows, seq_length, packed):
        padded.append((seq_length, sorted(len(t) for row in rows for t in row)))
        return real_lay_out(rows, seq_length, packed)

    torch.manual_seed(0)
    model = build_model(get_preset("qwen3_moe_tiny"))
    alone = routing_divergence(model, phi_shards, [0, 1], batch_size=1)
    monkeypatch.setattr(module, "lay_out_rows", recording_lay_out)
    paired = routing_divergence(model, phi_shards, [0, 1], batch_size=2)
    torch.testing.assert_close(torch.tensor(alone["hi"]), torch.tensor(paired["hi"]),
                               rtol=0, atol=1e-6)
    for language in ("en", "hi"):
        lengths = sorted((s.meta.token_count for s in phi_shards.samples(language)), reverse=True)
        pairs = [sorted(lengths[i:i + 2]) for i in range(0, len(lengths), 2)]
        assert all(pair in [p for _, p in padded] for pair in pairs), (pairs, padded)
