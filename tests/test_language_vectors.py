"""ShifCon's language vectors: L2-normalised sentence means (the authors' way, the default) and raw
token means, both against an independent computation with transformers' own model
(`output_hidden_states`) on the HF twin of a tiny model; the normalisation recorded in the file;
and language vectors padded as priors are under Phi-3 longrope (one forward runner)."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from test_convert_hf import _qwen3_moe  # noqa: E402  the tiny HF twin the converter tests use

from sara_megatron.data.corpus_sharding import ShardingConfig, shard_corpus  # noqa: E402
from sara_megatron.data.local_tokenizer import build_local_tokenizer  # noqa: E402
from sara_megatron.data.synthetic_corpus import corpus_texts, write_synthetic_corpus  # noqa: E402
from sara_megatron.data.token_shards import TokenShards  # noqa: E402
from sara_megatron.models.architecture import from_hf_config, get_preset  # noqa: E402
from sara_megatron.models.builder import build_model, causal_attention_mask  # noqa: E402
from sara_megatron.routing.forward_runner import ForwardRunner  # noqa: E402
from sara_megatron.sara.shifcon import transformer_layers  # noqa: E402
from sara_megatron.sara.shifcon_extraction import extract_language_vectors  # noqa: E402
from sara_megatron.sara.shifcon_vectors import (  # noqa: E402
    LanguageVectors,
    load_language_vectors,
    save_language_vectors,
)

LAYERS = (0, 1)  # the twin has 2 layers: the inputs of both (HF hidden_states[0] and [1])


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    path = tmp_path_factory.mktemp("twin") / "hf"
    _qwen3_moe(path)
    return path


def _transformers_vectors(hf_dir, shards, language, normalisation):
    """[L, H] float64 from transformers' model, one sample at a time, no padding."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    total, count = 0.0, 0
    for sample in shards.samples(language):
        ids = torch.from_numpy(shards.tokens(sample)).long()[None]
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states  # [0] = embeddings
        per_layer = torch.stack([states[layer][0].double() for layer in LAYERS])  # [L, T, H]
        if normalisation == "sentence_l2":
            total, count = total + F.normalize(per_layer.mean(1), dim=-1), count + 1
        else:
            total, count = total + per_layer.sum(1), count + per_layer.shape[1]
    return total / count


@pytest.mark.parametrize("normalisation", ["sentence_l2", "token_mean"])
def test_vectors_equal_transformers_hidden_states(single_rank, sara_data, twin, normalisation):
    from sara_megatron.conversion.hf_import import load_hf_weights

    shards = TokenShards(sara_data["shards"])
    model = build_model(from_hf_config(twin))
    load_hf_weights(model, twin)
    kwargs = {} if normalisation == "sentence_l2" else {"normalisation": normalisation}
    results = extract_language_vectors([model], shards, LAYERS, ["en", "sw"], 5,
                                       torch.device("cpu"), **kwargs)  # the default: sentence_l2
    for language in ("en", "sw"):
        got, tokens = results[language]
        assert tokens == sum(s.meta.token_count for s in shards.samples(language))
        want = _transformers_vectors(twin, shards, language, normalisation)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        if normalisation == "sentence_l2":  # a mean of unit vectors
            assert torch.all(got.norm(dim=-1) <= 1 + 1e-5)
    assert not torch.allclose(results["en"][0], results["sw"][0])


def test_the_file_records_its_normalisation(tmp_path):
    vectors = {"en": torch.ones(2, 4), "hi": torch.zeros(2, 4)}
    path = str(tmp_path / "v.safetensors")
    save_language_vectors(path, LanguageVectors((1, 3), vectors, "en", "fp", {"en": 3, "hi": 3},
                                                "sentence_l2"))
    assert load_language_vectors(path).normalisation == "sentence_l2"
    # A file from before the normalisation was recorded holds token means.
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
    del metadata["normalisation"]
    save_file(load_file(path), path, metadata=metadata)
    assert load_language_vectors(path).normalisation == "token_mean"


def test_an_unknown_normalisation_is_refused(single_rank, sara_data):
    model = build_model(get_preset("qwen3_moe_tiny"))
    with pytest.raises(ValueError, match="normalisation must be one of"):
        extract_language_vectors([model], TokenShards(sara_data["shards"]), (1,), ["en"], 2,
                                 torch.device("cpu"), normalisation="sentence_mean")


@torch.no_grad()
def _token_mean_padded_to(model, shards, language, layer, length):
    """Mean hidden state entering `layer` over every real token, each sample alone and padded at
    the end to `length` positions (or unpadded for None)."""
    module = transformer_layers([model])[layer]
    total, count = 0.0, 0
    for sample in shards.samples(language):
        tokens = shards.tokens(sample)
        n = len(tokens)
        s = length or n
        t = torch.zeros(1, s, dtype=torch.long)
        t[0, :n] = torch.as_tensor(tokens, dtype=torch.long)
        kept = {}
        handle = module.register_forward_pre_hook(
            lambda m, a, k: kept.__setitem__("h", k["hidden_states"]), with_kwargs=True)
        model(t, torch.arange(s)[None], causal_attention_mask(s))
        handle.remove()
        total, count = total + kept["h"][:n, 0].double().sum(0), count + n
    return total / count


def test_language_vectors_pad_as_priors_do_under_longrope(single_rank, tmp_path, monkeypatch):
    # Shards of seq_length 128 are trained past the tiny Phi's longrope switch (64): every pass
    # must read a sample under the long factors, a short sample alone included.
    from sara_megatron.priors import PriorStoreMetadata, PriorStoreWriter
    from sara_megatron.priors.extraction import ExtractionSettings, extract_priors

    paths = write_synthetic_corpus(tmp_path / "corpus", 6, languages=("en", "hi"), max_words=80)
    build_local_tokenizer(corpus_texts(paths), tmp_path / "tokenizer")
    shard_corpus(ShardingConfig((str(tmp_path / "corpus"),), str(tmp_path / "shards"),
                                str(tmp_path / "tokenizer"), seq_length=128, shard_size=6))
    shards = TokenShards(tmp_path / "shards")
    switch = get_preset("phi35_moe_tiny").longrope.original_max_position_embeddings
    assert min(s.meta.token_count for s in shards.samples("en")) <= switch
    torch.manual_seed(0)
    model = build_model(get_preset("phi35_moe_tiny")).eval()

    lengths = {"vectors": [], "priors": []}
    real = ForwardRunner.padded_length
    current = {}

    def recording(self, longest, agree=True):
        length = real(self, longest, agree)
        lengths[current["pass"]].append((longest, length))
        return length

    monkeypatch.setattr(ForwardRunner, "padded_length", recording)
    current["pass"] = "vectors"
    vectors = extract_language_vectors([model], shards, (1,), ["en"], 1, torch.device("cpu"),
                                       normalisation="token_mean")["en"][0][0]
    current["pass"] = "priors"
    meta = PriorStoreMetadata(layers=(1,), num_experts=get_preset("phi35_moe_tiny").num_experts,
                              dtype="fp32", anchor_language="en", model_fingerprint="fp",
                              corpus_fingerprint=shards.language_fingerprint("en"))
    extract_priors(model, shards, PriorStoreWriter(tmp_path / "priors", meta),
                   ExtractionSettings(layers=(1,), micro_batch_size=1, packing=False))
    # Both passes pad each sample alone past the switch, the short ones included.
    for name in ("vectors", "priors"):
        assert len(lengths[name]) == len(shards.samples("en"))
        assert any(longest <= switch for longest, _ in lengths[name])
        assert all(length > switch for _, length in lengths[name])
    # And the vectors are those of training's regime, not of the unpadded forward.
    # (The tiny random model's hidden states are O(1e-3): the distances are compared, not set.)
    as_trained = _token_mean_padded_to(model, shards, "en", 1, shards.seq_length)
    unpadded = _token_mean_padded_to(model, shards, "en", 1, None)
    off_trained = (vectors.double() - as_trained).abs().max()
    off_unpadded = (vectors.double() - unpadded).abs().max()
    assert off_trained < off_unpadded / 100, (off_trained, off_unpadded)
