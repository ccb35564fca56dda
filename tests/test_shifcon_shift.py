"""ShifCon's shift outside training: a ShifCon run's checkpoint carries its shift, the export
carries it on, and evaluation (`--backend hf`) and the divergence analysis apply it per language,
so that the evaluated model computes what the shifted training forward computes; a served ShifCon
export is refused unless the user says to evaluate it unshifted."""

import json

import pytest
import torch

from sara_megatron.evaluation.backends import HFBackend, SamplingSettings
from sara_megatron.evaluation.records import read_results
from sara_megatron.models.builder import causal_attention_mask
from sara_megatron.sara.language_shift import (
    SIDECAR_FILE,
    VECTORS_FILE,
    ShiftSidecarError,
    read_shift_sidecar,
    shifted,
)
from sara_megatron.sara.shifcon import transformer_layers
from sara_megatron.sara.shifcon_vectors import LanguageVectors, save_language_vectors
from test_evaluation_hf import FIXTURES, evaluate_tool

LAYERS = (1, 3)


@pytest.fixture(scope="module")
def shifcon_run(sara_data, tmp_path_factory):
    """A tiny HF model imported, one ShifCon training step from it (saved), and its export."""
    from sara_megatron.conversion.hf_export import export_hf_checkpoint
    from sara_megatron.conversion.hf_import import import_hf_checkpoint
    from sara_megatron.demo import write_tiny_hf_model
    from sara_megatron.distributed import ParallelConfig, initialize_distributed
    from sara_megatron.priors.fingerprint import model_fingerprint
    from sara_megatron.training import Trainer, load_train_config

    initialize_distributed(ParallelConfig(), seed=1234)
    root = tmp_path_factory.mktemp("shifcon_shift")
    write_tiny_hf_model(root / "hf", sara_data["root"] / "tokenizer")
    import_hf_checkpoint(root / "hf", root / "mcore")
    hidden = json.loads((root / "hf" / "config.json").read_text())["hidden_size"]
    g = torch.Generator().manual_seed(5)
    vectors = LanguageVectors(LAYERS, {lang: torch.randn(len(LAYERS), hidden, generator=g)
                                       for lang in ("en", "hi", "sw")},
                              "en", model_fingerprint(root / "mcore"), {"en": 1, "hi": 1, "sw": 1})
    save_language_vectors(str(root / "vectors.safetensors"), vectors)
    values = {"model.preset": root / "hf", "model.checkpoint": root / "mcore",
              "data.shards_dir": sara_data["shards"], "data.seq_length": 64,
              "data.micro_batch_size": 2, "data.global_batch_size": 4, "data.languages": "all",
              "optim.train_steps": 1, "sara.lambda_js": 0, "sara.layers": "all",
              "sara.objective": "shifcon",
              "shifcon.language_vectors": root / "vectors.safetensors",
              "shifcon.shift_layer": LAYERS[0], "shifcon.shift_back_layer": LAYERS[1],
              "checkpoint.save_dir": root / "run"}
    trainer = Trainer(load_train_config(None, [f"{k}={v}" for k, v in values.items()]))
    trainer.run()
    checkpoint = root / "run" / "iter_0000001"
    export_hf_checkpoint(checkpoint, root / "export")
    return {"trainer": trainer, "checkpoint": checkpoint, "export": root / "export",
            "vectors": vectors, "root": root}


def _sample_tokens(sara_data, language):
    from sara_megatron.data.token_shards import TokenShards

    shards = TokenShards(sara_data["shards"])
    return torch.from_numpy(shards.tokens(shards.samples(language)[0])).long()[None]


def test_the_export_carries_the_shift(shifcon_run):
    for folder in (shifcon_run["checkpoint"], shifcon_run["export"]):
        shift = read_shift_sidecar(folder)
        assert (shift.shift_layer, shift.shift_back_layer) == LAYERS
        assert shift.anchor_language == "en" and shift.languages == ["en", "hi", "sw"]
        for lang in ("hi", "sw"):
            assert torch.equal(shift.vectors.vectors[lang], shifcon_run["vectors"].vectors[lang])
    # the HF fingerprint covers the shift (and, through its recorded sha256, the vectors)
    from sara_megatron.evaluation.model_identity import hf_model_files

    assert SIDECAR_FILE in hf_model_files(str(shifcon_run["export"]))


def test_evaluated_logits_are_the_shifted_training_forward(shifcon_run, sara_data):
    """The HF backend's model, shifted for the prompt's language, gives the logits of the
    trained megatron model run through the objective's own shift hooks; unshifted it does not;
    the anchor language is not shifted."""
    trainer = shifcon_run["trainer"]
    model = trainer.chunks[0].module
    model.eval()
    objective = trainer.state.objectives[0].term  # the training objective's shift hooks
    tokens = _sample_tokens(sara_data, "sw")
    s = tokens.shape[1]
    objective.set_batch(["sw"], torch.zeros(1, s, dtype=torch.bool))  # shift only, no anchors
    with torch.no_grad():
        trained = model(tokens, torch.arange(s)[None], causal_attention_mask(s)).float()
    backend = HFBackend(shifcon_run["export"], SamplingSettings(), dtype="float32", device="cpu",
                        shift=read_shift_sidecar(shifcon_run["export"]))
    vocab = backend.lm.config.vocab_size
    trained = trained[..., :vocab]
    with torch.no_grad():
        with backend.language_shift("sw"):
            evaluated = backend.lm(input_ids=tokens).logits.float()
        plain = backend.lm(input_ids=tokens).logits.float()
        with backend.language_shift("en"):
            anchor = backend.lm(input_ids=tokens).logits.float()
    torch.testing.assert_close(evaluated, trained, rtol=1e-4, atol=1e-4)
    assert (plain - trained).abs().max() > 1e-2  # the shift matters to these logits
    assert torch.equal(anchor, plain)
    # the scoring path the runner calls is shifted the same way
    messages = [{"role": "user", "content": "1 2 3"}]
    assert backend.continuation_logprobs(messages, ["4"], "sw") != backend.continuation_logprobs(
        messages, ["4"], None)


def test_evaluate_tool_shifts_and_a_server_is_refused(shifcon_run, tmp_path, capsys):
    export = str(shifcon_run["export"])
    common = ["--data-dir", str(FIXTURES), "--benchmarks", "mgsm", "--languages", "sw,en",
              "--runs", "1", "--limit", "1", "--max-new-tokens", "2", "--no-progress"]
    tool = evaluate_tool()
    out = tmp_path / "hf"
    assert tool.main(["--backend", "hf", "--model-dir", export, "--dtype", "float32",
                      "--device", "cpu", "--output", str(out), *common]) == 0
    assert read_results(out)["settings"]["shifcon_shift"] == "applied"
    assert "ShifCon shift entering layer 1, back entering layer 3" in capsys.readouterr().err
    # the answers of a shifted evaluation are not resumed unshifted
    assert tool.main(["--backend", "hf", "--model-dir", export, "--dtype", "float32",
                      "--device", "cpu", "--output", str(out), "--no-shift", *common]) == 2
    assert "shifcon_shift" in capsys.readouterr().err
    served = ["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
              "--model-revision", export, "--output", str(tmp_path / "served"), *common]
    assert tool.main(served) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a ShifCon export" in err and "--no-shift" in err
    # a language the run has no vector for is refused before the model loads
    other = [a if a != "sw,en" else "sw,en,te" for a in common]
    assert tool.main(["--backend", "hf", "--model-dir", export, "--output",
                      str(tmp_path / "te"), *other]) == 2
    assert "none for te" in capsys.readouterr().err


def test_an_altered_sidecar_is_refused(shifcon_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shifcon_run["export"], copy)
    with open(copy / VECTORS_FILE, "ab") as f:
        f.write(b" ")
    with pytest.raises(ShiftSidecarError, match="sha256 differs"):
        read_shift_sidecar(copy)
    (copy / VECTORS_FILE).unlink()
    with pytest.raises(ShiftSidecarError, match="missing"):
        read_shift_sidecar(copy)


def test_the_divergence_analysis_measures_the_shifted_model(shifcon_run, sara_data):
    """routing_analysis with the shift equals the divergence computed from routing measured with
    plain hooks adding each target's deltas (the anchor's unshifted); the shift changes it."""
    from sara_megatron.analysis.parallel_set import as_parallel_set
    from sara_megatron.analysis.routing_divergence import _sequence_routing, routing_analysis
    from sara_megatron.data.token_shards import TokenShards
    from sara_megatron.analysis.model_loading import load_analysis_weights
    from sara_megatron.kernels.routing_js_reference import js_divergence_from_mean
    from sara_megatron.models.architecture import resolve_architecture
    from sara_megatron.models.builder import build_model

    # as tools/routing_divergence.py loads it (no training hooks on it)
    model = build_model(resolve_architecture(str(shifcon_run["root"] / "hf")))
    load_analysis_weights(model, shifcon_run["checkpoint"])
    shards = TokenShards(sara_data["shards"])
    shift = read_shift_sidecar(shifcon_run["checkpoint"])
    layers = [0, 1, 2, 3]
    got = routing_analysis(model, shards, layers, ["sw"], batch_size=4, shift=shift)
    plain = routing_analysis(model, shards, layers, ["sw"], batch_size=4)
    assert got.divergence["sw"][0] == plain.divergence["sw"][0]  # the layer before the shift
    assert got.divergence["sw"][1] != plain.divergence["sw"][1]

    data = as_parallel_set(shards)
    modules = transformer_layers([model])
    hooks = [modules[layer].register_forward_pre_hook(
        lambda m, a, k, d=sign * (shift.vectors.at("en", layer) - shift.vectors.at("sw", layer)):
        (a, dict(k, hidden_states=k["hidden_states"] + d)), with_kwargs=True)
        for layer, sign in ((1, 1.0), (3, -1.0))]
    model.eval()
    target = _sequence_routing(model, data, data.sequences("sw"), layers, 4)
    for h in hooks:
        h.remove()
    anchor = _sequence_routing(model, data, data.sequences("en"), layers, 4)
    common = sorted(set(anchor) & set(target))
    p = torch.stack([anchor[i].mean for i in common])
    q = torch.stack([target[i].mean for i in common])
    want = js_divergence_from_mean(p, q, torch.ones(p.shape[:2])).mean(0).tolist()
    assert got.divergence["sw"] == pytest.approx(want, rel=1e-6, abs=1e-9)
