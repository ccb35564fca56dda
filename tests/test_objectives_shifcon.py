"""ShifCon baseline: language vectors (the tool against a plain per-sample computation), the
shift and contrastive term inside the model against plain autograd (the released symmetric,
layer-averaged, anchor-trained contrast and this project's earlier one-way, one-layer one), zero
coefficient and equal vectors reproduce FFT exactly up to the CE weight, a training step logs its
contrastive term, and a packed step (rows of several samples of mixed languages) equals the
padded step."""

import pytest
import torch
import torch.nn.functional as F

import launch

from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import ModelOptions, build_model, causal_attention_mask
from sara_megatron.sara.shifcon import ShifconObjective, transformer_layers
from sara_megatron.sara.shifcon_vectors import (
    LanguageVectors,
    load_language_vectors,
    save_language_vectors,
)

LAYERS = (1, 3)
# The settings this project ran before the released ones became the defaults.
LEGACY = {"shifcon.temperature": 0.05, "shifcon.contrastive_coeff": 1.0, "shifcon.ce_weight": 1.0,
          "shifcon.symmetric": "false", "shifcon.anchor_gradient": "false",
          "shifcon.contrast_layers": "shift_back"}


@pytest.fixture(scope="module")
def vectors_file(sara_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("shifcon") / "vectors.safetensors"
    launch.run_checked(launch.torchrun_command(
        "extract_language_vectors", "--shards", sara_data["shards"], "--checkpoint",
        sara_data["checkpoint"], "--model", "qwen3_moe_tiny", "--output", out, "--layers", "1,3",
        "--micro-batch-size", "5", "--normalisation", "token_mean", nproc=1), cwd=out.parent)
    return out


def test_language_vectors_are_mean_hidden_states(single_rank, sara_data, vectors_file):
    from sara_megatron.checkpointing import load_model_weights
    from sara_megatron.data.token_shards import TokenShards

    vectors = load_language_vectors(str(vectors_file))
    shards = TokenShards(sara_data["shards"])
    assert vectors.layers == LAYERS and vectors.anchor_language == "en"
    assert vectors.normalisation == "token_mean"  # as asked of the tool (its default: sentence_l2)
    assert sorted(vectors.vectors) == sorted(shards.languages)
    model = build_model(get_preset("qwen3_moe_tiny"))
    load_model_weights(model, str(sara_data["checkpoint"]))
    model.eval()
    layers = transformer_layers([model])
    for language in ("en", "sw"):
        sums = {layer: 0.0 for layer in LAYERS}
        tokens_seen = 0
        for sample in shards.samples(language):  # one unpadded sequence at a time
            tokens = torch.from_numpy(shards.tokens(sample)).long()[None]
            kept = {}
            hooks = [layers[layer].register_forward_pre_hook(
                lambda m, a, k, layer=layer: kept.__setitem__(layer, k["hidden_states"]),
                with_kwargs=True) for layer in LAYERS]
            with torch.no_grad():
                model(tokens, torch.arange(tokens.shape[1])[None], causal_attention_mask(tokens.shape[1]))
            for h in hooks:
                h.remove()
            for layer in LAYERS:
                sums[layer] = sums[layer] + kept[layer].double().sum((0, 1))
            tokens_seen += tokens.shape[1]
        assert vectors.tokens[language] == tokens_seen
        for i, layer in enumerate(LAYERS):
            torch.testing.assert_close(vectors.vectors[language][i],
                                       (sums[layer] / tokens_seen).float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(vectors.vectors["en"], vectors.vectors["sw"])


def test_extraction_takes_its_process_groups(single_rank, sara_data, vectors_file):
    """The library pass, called with the groups its tool hands it, gives the tool's file; with no
    groups it is one process alone, and it reads no global parallel state of its own."""
    import inspect

    from sara_megatron.checkpointing import load_model_weights
    from sara_megatron.data.token_shards import TokenShards
    from sara_megatron.distributed import model_process_groups
    from sara_megatron.sara import shifcon_extraction

    assert "parallel_state" not in inspect.getsource(shifcon_extraction)
    written = load_language_vectors(str(vectors_file))
    shards = TokenShards(sara_data["shards"])
    model = build_model(get_preset("qwen3_moe_tiny"))
    load_model_weights(model, str(sara_data["checkpoint"]))
    for groups in (model_process_groups(), None):
        results = shifcon_extraction.extract_language_vectors(
            [model], shards, LAYERS, ["en", "sw"], 5, torch.device("cpu"), process_groups=groups,
            normalisation="token_mean")
        for language in ("en", "sw"):
            vectors, tokens = results[language]
            assert tokens == written.tokens[language]
            torch.testing.assert_close(vectors, written.vectors[language], rtol=1e-5, atol=1e-6)


def _random_vectors(hidden, languages=("en", "hi"), equal=False):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(len(LAYERS), hidden, generator=g)
    vecs = {lang: base.clone() if equal else torch.randn(len(LAYERS), hidden, generator=g)
            for lang in languages}
    return LanguageVectors(LAYERS, vecs, "en", "fp", {lang: 1 for lang in languages})


def _shift_deltas(vectors, languages, hidden):
    """{layer: [B, H] what the shift adds to each row entering it}: v_en − v_lang, 0 for en."""
    return {layer: torch.stack([torch.zeros(hidden) if lang == "en" else
                                vectors.at("en", layer) - vectors.at(lang, layer)
                                for lang in languages]) for layer in LAYERS}


def test_gradient_matches_plain_autograd(single_rank):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    torch.manual_seed(0)
    model = build_model(get_preset("qwen3_moe_tiny"), ModelOptions(moe_aux_loss_coeff=0.0))
    model.train()
    b, s, coeff, tau = 3, 8, 0.7, 0.1
    hidden = model.config.hidden_size
    vectors = _random_vectors(hidden)
    languages = ["hi", "en", "hi"]
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (b, s), generator=g)
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[2, 5:] = True
    anchors = torch.randn(5, hidden, generator=g)  # positives at offset 1, plus negatives
    positions = torch.arange(s).expand(b, s)

    def forward():
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
        model.zero_grad(set_to_none=True)
        return model(tokens, positions, causal_attention_mask(s))

    objective = ShifconObjective(vectors, 1, 3, coeff, tau, symmetric=False,
                                 anchor_gradient=False, contrast_layers="shift_back")
    handles = objective.attach([model])
    objective.set_batch(languages, padding, {3: anchors}, positive_offset=1)
    out = forward()
    (out * 0).sum().backward()
    for h in handles:
        h.remove()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    shifted_out = out.detach()

    # Reference: plain hooks that shift, a kept layer-3 input, the InfoNCE written out.
    deltas = _shift_deltas(vectors, languages, hidden)
    kept = {}

    def shift(m, a, k):
        return a, dict(k, hidden_states=k["hidden_states"] + deltas[1][None])

    def keep_and_unshift(m, a, k):
        kept["h"] = k["hidden_states"]
        return a, dict(k, hidden_states=k["hidden_states"] - deltas[3][None])

    layers = transformer_layers([model])
    hooks = [layers[1].register_forward_pre_hook(shift, with_kwargs=True),
             layers[3].register_forward_pre_hook(keep_and_unshift, with_kwargs=True)]
    out = forward()
    for h in hooks:
        h.remove()
    assert torch.equal(out.detach(), shifted_out)
    valid = (~padding).t().float()[..., None]  # [S, B, 1]
    pooled = (kept["h"] * valid).sum(0) / valid.sum(0)
    sims = torch.stack([torch.stack([F.cosine_similarity(pooled[i], anchors[j], dim=0)
                                     for j in range(anchors.shape[0])]) for i in range(b)]) / tau
    loss = 0.0
    contrasted = [i for i, lang in enumerate(languages) if lang != "en"]
    for i in contrasted:
        loss = loss - (sims[i, 1 + i] - torch.logsumexp(sims[i], 0))
    (coeff * loss / len(contrasted) + (out * 0).sum()).backward()
    want = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    assert got["decoder.layers.0.self_attention.linear_qkv.weight"].abs().sum() > 0
    assert float(objective.loss_sum) > 0 and float(objective.sequences) == 2


def test_released_contrast_matches_a_hand_written_symmetric_info_nce(single_rank):
    """The released settings (symmetric InfoNCE at τ 1 on the inputs of the shifted area's
    layers 1 and 2, averaged, the anchor side trained through its own forward) against an
    independent eval-mode anchor forward, plain shift hooks and the InfoNCE written out: the
    logged loss and every gradient; the anchor side's share of the gradient is not small."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from sara_megatron.sara.online_priors import AnchorRowsView

    torch.manual_seed(0)
    model = build_model(get_preset("qwen3_moe_tiny"), ModelOptions(moe_aux_loss_coeff=0.0))
    model.train()
    b, s, coeff = 4, 8, 0.7
    hidden = model.config.hidden_size
    vectors = _random_vectors(hidden)
    languages = ["hi", "en", "hi", "hi"]
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (b, s), generator=g)
    anchor_tokens = torch.randint(0, 256, (b, s), generator=g)
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[2, 5:] = True
    anchor_padding = torch.zeros(b, s, dtype=torch.bool)
    anchor_padding[0, 6:] = True
    positions = torch.arange(s).expand(b, s)

    def forward(rows):
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
        return model(rows, positions, causal_attention_mask(s))

    objective = ShifconObjective(vectors, 1, 3, coeff, 1.0)  # the class defaults: as released
    assert objective.contrast_layers == (1, 2)
    assert objective.symmetric and objective.anchor_gradient
    handles = objective.attach([model])
    view = AnchorRowsView(anchor_tokens, anchor_padding, None, None, b)
    anchors, offset = objective.anchor_features_with_grad(model, view, torch.device("cpu"))
    assert model.training and offset == 0 and sorted(anchors) == [1, 2]
    objective.set_batch(languages, padding, anchors)
    out = forward(tokens)
    (out * 0).sum().backward()
    for h in handles:
        h.remove()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    shifted_out = out.detach()

    # Reference: the anchors through a plain eval-mode forward, the samples through plain shift
    # hooks; each contrast layer's input kept.
    deltas = _shift_deltas(vectors, languages, hidden)
    layers = transformer_layers([model])
    kept = {}

    def keep(layer, delta=None):
        def hook(m, a, k):
            h = k["hidden_states"] if delta is None else k["hidden_states"] + delta[None]
            kept[layer] = h
            return a, dict(k, hidden_states=h)
        return hook

    def unshift(m, a, k):
        return a, dict(k, hidden_states=k["hidden_states"] - deltas[3][None])

    model.zero_grad(set_to_none=True)
    model.eval()
    hooks = [layers[layer].register_forward_pre_hook(keep(layer), with_kwargs=True)
             for layer in (1, 2)]
    forward(anchor_tokens)
    for h in hooks:
        h.remove()
    anchor_kept = dict(kept)
    model.train()
    hooks = [layers[1].register_forward_pre_hook(keep(1, deltas[1]), with_kwargs=True),
             layers[2].register_forward_pre_hook(keep(2), with_kwargs=True),
             layers[3].register_forward_pre_hook(unshift, with_kwargs=True)]
    out = forward(tokens)
    for h in hooks:
        h.remove()
    assert torch.equal(out.detach(), shifted_out)

    def pool(h, pad):
        valid = (~pad).t().float()[..., None]  # [S, B, 1]
        return (h * valid).sum(0) / valid.sum(0)

    contrasted = [i for i, lang in enumerate(languages) if lang != "en"]
    m = len(contrasted)

    def total(detach_anchors):
        value = 0.0
        for layer in (1, 2):
            z = pool(kept[layer], padding)[contrasted]
            a = pool(anchor_kept[layer], anchor_padding)[contrasted]
            a = a.detach() if detach_anchors else a
            sims = torch.stack([torch.stack([F.cosine_similarity(z[i], a[j], dim=0)
                                             for j in range(m)]) for i in range(m)])  # τ = 1
            for k in range(m):
                value = value - 0.5 * (sims[k, k] - torch.logsumexp(sims[k], 0))
                value = value - 0.5 * (sims[k, k] - torch.logsumexp(sims[:, k], 0))
        return value / 2  # the mean over the two layers

    reference = total(detach_anchors=False)
    (coeff * reference / m + (out * 0).sum()).backward(retain_graph=True)
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert float(objective.loss_sum) == pytest.approx(float(reference.detach()), rel=1e-5)
    assert float(objective.sequences) == m
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)
    (coeff * total(detach_anchors=True) / m).backward()
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    anchor_share = (want[name] - model.get_parameter(name).grad).norm()
    assert anchor_share > 0.05 * want[name].norm()


def _trainer(data, vectors_path, **extra):
    from sara_megatron.training import Trainer, load_train_config

    values = {"model.preset": "qwen3_moe_tiny", "model.checkpoint": data["checkpoint"],
              "data.shards_dir": data["shards"], "data.seq_length": 64,
              "data.micro_batch_size": 2, "data.global_batch_size": 4, "data.languages": "all",
              "optim.train_steps": 1, "sara.layers": "all", "model.moe_aux_loss_coeff": 0.0,
              "sara.lambda_js": 0}
    if vectors_path is not None:
        values.update({"sara.objective": "shifcon", "shifcon.language_vectors": vectors_path,
                       "shifcon.shift_layer": 1, "shifcon.shift_back_layer": 3})
    values.update(extra)
    return Trainer(load_train_config(None, [f"{k}={v}" for k, v in values.items()]))


def _step(trainer):
    record = trainer.train_step()
    return record, {n: p.main_grad.detach().clone()
                    for n, p in trainer.chunks[0].module.named_parameters()}


def test_zero_coefficient_and_equal_vectors_reproduce_fft(single_rank, sara_data, vectors_file,
                                                         tmp_path):
    """With λ_con 0 and every language's vectors equal, a ShifCon step is an FFT step, its
    gradients scaled exactly by the CE weight (the released 0.5 by default); the shift acts."""
    real = load_language_vectors(str(vectors_file))
    equal = LanguageVectors(real.layers, {k: real.vectors["en"] for k in real.vectors},
                            real.anchor_language, real.model_fingerprint, real.tokens)
    save_language_vectors(str(tmp_path / "equal.safetensors"), equal)
    unclipped = {"optim.clip_grad": 0}  # clipping would rescale the halved gradients
    fft, fft_grads = _step(_trainer(sara_data, None, **unclipped))
    zero, zero_grads = _step(_trainer(sara_data, tmp_path / "equal.safetensors", **unclipped,
                                      **{"shifcon.contrastive_coeff": 0, "shifcon.ce_weight": 1}))
    assert zero.ce == fft.ce and zero.grad_norm == fft.grad_norm
    for name in fft_grads:
        assert torch.equal(zero_grads[name], fft_grads[name]), name
    assert zero.terms["shifcon_contrastive"] > 0  # computed and logged even at λ = 0
    half, half_grads = _step(_trainer(sara_data, tmp_path / "equal.safetensors", **unclipped,
                                      **{"shifcon.contrastive_coeff": 0}))
    assert half.ce == fft.ce  # logged unweighted
    assert half.grad_norm == pytest.approx(fft.grad_norm / 2, rel=1e-6)
    for name in fft_grads:
        assert torch.equal(half_grads[name], fft_grads[name] / 2), name
    shifted, _ = _step(_trainer(sara_data, vectors_file, **{"shifcon.ce_weight": 1}))
    assert shifted.ce != fft.ce and shifted.grad_norm != fft.grad_norm  # the shift acts


def test_a_packed_step_is_the_padded_step(single_rank, sara_data, vectors_file):
    """The same 4 samples (languages mixed within packed rows) in one micro-batch either way, so
    the same negatives: CE, the contrastive term and every gradient as padded (fp32)."""
    runs = {}
    for packing in ("false", "true"):
        trainer = _trainer(sara_data, vectors_file, **{
            "data.packing": packing, "data.seq_length": 128, "data.micro_batch_size": 4,
            "shifcon.contrastive_coeff": 0.5})
        seen = launch.record_micro_batches(trainer)
        record, grads = _step(trainer)
        runs[packing] = (record, grads, seen)
    padded, padded_grads, (padded_mb,) = runs["false"]
    packed, packed_grads, (packed_mb,) = runs["true"]
    assert sorted(zip(packed_mb.languages, packed_mb.sample_ids)) == sorted(
        zip(padded_mb.languages, padded_mb.sample_ids))
    assert int((~packed_mb.padding_mask).any(1).sum()) < 4  # fewer real rows than samples
    row_languages = [{packed_mb.languages[k] for k in row[row >= 0].unique().tolist()}
                     for row in packed_mb.segment_ids]
    assert any(len(langs) > 1 for langs in row_languages)  # a row shifts two ways
    assert "en" in packed_mb.languages and len(set(packed_mb.languages)) > 1
    assert packed.terms["shifcon_contrastive"] > 0
    assert packed.ce == pytest.approx(padded.ce, rel=1e-6)
    assert packed.terms["shifcon_contrastive"] == pytest.approx(
        padded.terms["shifcon_contrastive"], rel=1e-5)
    assert packed.grad_norm == pytest.approx(padded.grad_norm, rel=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_the_term_averages_over_the_contrasted_sequences(single_rank, sara_data, vectors_file,
                                                        monkeypatch):
    """With data.languages: all the batch holds anchor-language samples, which are not
    contrasted: what the term adds to the loss (after megatron's division by the loss tokens) is
    λ_con times the mean over the contrasted sequences, the logged value (one term on each of
    the area's two layer inputs, each half of it)."""
    from megatron.core.transformer.moe import moe_utils

    coeff = 0.5
    trainer = _trainer(sara_data, vectors_file, **{"shifcon.contrastive_coeff": coeff,
                                                   "data.global_batch_size": 8})
    attached = []
    scaler = moe_utils.MoEAuxLossAutoScaler
    apply = scaler.apply

    def recording_apply(activation, loss):
        if activation.dim() == 3:  # [S, B, H]: ShifCon's terms on the layer inputs
            attached.append(float(loss))
        return apply(activation, loss)

    monkeypatch.setattr(scaler, "apply", recording_apply)
    seen = launch.record_micro_batches(trainer)
    record, _ = _step(trainer)
    languages = [lang for mb in seen for lang in mb.languages]
    assert "en" in languages and len(attached) == 2 * len(seen)
    contrasted = sum(lang != "en" for lang in languages)
    assert contrasted < len(languages)
    loss_tokens = float(sum(mb.loss_mask.sum() for mb in seen))
    assert sum(attached) / loss_tokens == pytest.approx(
        coeff * record.terms["shifcon_contrastive"], rel=1e-5)


def test_settings_are_checked(single_rank, sara_data, vectors_file):
    from sara_megatron.training.config import ConfigError, load_train_config

    with pytest.raises(ConfigError, match="needs shifcon.language_vectors"):
        load_train_config(None, ["sara.objective=shifcon"])
    with pytest.raises(ConfigError, match="must come before"):
        load_train_config(None, ["sara.objective=shifcon", "shifcon.language_vectors=x",
                                 "shifcon.shift_layer=3", "shifcon.shift_back_layer=1"])
    with pytest.raises(ValueError, match="needs layer 2"):
        _trainer(sara_data, vectors_file, **{"shifcon.shift_back_layer": 2})
    with pytest.raises(ConfigError, match="contrast_layers must be one of"):
        load_train_config(None, ["shifcon.contrast_layers=all"])
    with pytest.raises(ConfigError, match="shifcon.anchor_gradient with pipeline parallelism"):
        load_train_config(None, ["sara.objective=shifcon", "shifcon.language_vectors=x",
                                 "shifcon.shift_layer=1", "shifcon.shift_back_layer=3",
                                 "parallel.pp=2"])
    load_train_config(None, ["sara.objective=shifcon", "shifcon.language_vectors=x",
                             "shifcon.shift_layer=1", "shifcon.shift_back_layer=3",
                             "parallel.pp=2", "shifcon.anchor_gradient=false"])


def test_shifcon_trains_lora_adapters(single_rank, sara_data, vectors_file):
    """ShifCon with LoRA: the contrastive term's gradient reaches the adapters (a step at
    contrastive_coeff 0 gives other adapter gradients) and the base weights get none."""
    def step(coeff):
        trainer = _trainer(sara_data, vectors_file, **{"peft.method": "lora",
                                                       "shifcon.contrastive_coeff": coeff})
        record = trainer.train_step()
        module = trainer.chunks[0].module
        assert all(n.endswith(("lora_a", "lora_b", "router.weight"))
                   for n, p in module.named_parameters() if p.requires_grad)
        return record, {n: p.main_grad.detach().clone() for n, p in module.named_parameters()
                        if p.requires_grad}

    zero, zero_grads = step(0)
    shifcon, grads = step(1.0)
    assert shifcon.terms["shifcon_contrastive"] > 0
    lora_b = [n for n in grads if n.endswith("lora_b")]
    assert lora_b and any(not torch.equal(grads[n], zero_grads[n]) for n in lora_b)


def test_the_anchors_ride_on_their_micro_batch(single_rank, sara_data, vectors_file):
    """The step's preparation gives each micro-batch its own anchor side, carried on the
    micro-batch itself; the loader's micro-batches are left as they were. Constant anchors
    (`anchor_gradient: false`): the pooled anchors of its samples, this rank's first at offset
    0, the anchor rows' mean hidden states entering the contrast layer from a forward without
    shift. Trained anchors (the default): its anchor rows, forwarded with its own forward."""
    from sara_megatron.sara.online_priors import AnchorRowsView
    from sara_megatron.training.step import fetch_microbatches, prepare_batch

    trainer = _trainer(sara_data, vectors_file, **{"data.micro_batch_size": 1, **LEGACY})
    loaded = fetch_microbatches(trainer.state, trainer.plan.num_microbatches)
    batch = prepare_batch(trainer.state, trainer.cfg, loaded)
    assert len(batch.microbatches) == len(loaded) == 4
    model = trainer.chunks[0].module
    layer = transformer_layers([model])[3]
    for original, mb in zip(loaded, batch.microbatches):
        assert original.objective_inputs == {}
        anchors, offset = mb.objective_inputs["shifcon"]
        assert offset == 0 and sorted(anchors) == [3]
        assert anchors[3].shape == (1, model.config.hidden_size)
        kept = {}
        hook = layer.register_forward_pre_hook(
            lambda m, a, k: kept.__setitem__("h", k["hidden_states"]), with_kwargs=True)
        tokens = original.anchor_tokens
        real = ~original.anchor_padding_mask[0]
        model.eval()
        with torch.no_grad():
            model(tokens, torch.arange(tokens.shape[1])[None],
                  causal_attention_mask(tokens.shape[1]))
        hook.remove()
        want = kept["h"][:, 0][real].float().mean(0)
        torch.testing.assert_close(anchors[3][0], want, rtol=1e-4, atol=1e-5)

    trainer = _trainer(sara_data, vectors_file, **{"data.micro_batch_size": 1})
    loaded = fetch_microbatches(trainer.state, trainer.plan.num_microbatches)
    batch = prepare_batch(trainer.state, trainer.cfg, loaded)
    for original, mb in zip(loaded, batch.microbatches):
        view = mb.objective_inputs["shifcon"]
        assert isinstance(view, AnchorRowsView)
        assert torch.equal(view.tokens, original.anchor_tokens)


def _normalised_sentence_states(model, tokens, padding):
    """{layer: [R, H] fp64 L2-normalised mean over each row's real tokens entering it}, from a
    plain eval-mode forward with hooks on the layers a and b."""
    layers = transformer_layers([model])
    kept = {}
    hooks = [layers[layer].register_forward_pre_hook(
        lambda m, a, k, layer=layer: kept.__setitem__(layer, k["hidden_states"]),
        with_kwargs=True) for layer in LAYERS]
    model.eval()
    with torch.no_grad():
        model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens),
              causal_attention_mask(tokens.shape[1]))
    model.train()
    for h in hooks:
        h.remove()
    valid = (~padding).t().float()[..., None]  # [S, R, 1]
    return {layer: F.normalize(((kept[layer] * valid).sum(0) / valid.sum(0).clamp_min(1))
                               .double(), dim=-1) for layer in LAYERS}


def _step_means(model, microbatches):
    """{language: [2, H]} the step's mean normalised sentence states: anchor rows for en, the
    samples' own rows for the others."""
    sums, counts = {}, {}

    def add(lang, states, k):
        row = torch.stack([states[layer][k] for layer in LAYERS])
        sums[lang] = sums.get(lang, 0) + row
        counts[lang] = counts.get(lang, 0) + 1

    for mb in microbatches:
        anchors = _normalised_sentence_states(model, mb.anchor_tokens, mb.anchor_padding_mask)
        for k in range(mb.anchor_tokens.shape[0]):
            add("en", anchors, k)
        own = _normalised_sentence_states(model, mb.tokens, mb.padding_mask)
        for k, lang in enumerate(mb.languages):
            if lang != "en":
                add(lang, own, k)
    return {lang: sums[lang] / counts[lang] for lang in sums}


def test_online_vectors_are_the_running_mean_of_step_means(single_rank, sara_data, vectors_file,
                                                           tmp_path):
    """shifcon.online_vectors: before each step the vectors become the running mean of the
    steps' per-language means of L2-normalised sentence states entering layers a and b, taken by
    plain forwards of the step's anchor rows (en) and own rows (the others) on the model as it
    is; the checkpoint carries the running sums and a resume continues them."""
    from sara_megatron.sara.shifcon_online import STATE_FILE
    from sara_megatron.training.step import fetch_microbatches, prepare_batch

    settings = {"shifcon.online_vectors": "true", "optim.train_steps": 2,
                "checkpoint.save_dir": tmp_path / "run", "checkpoint.save_interval": 1}
    trainer = _trainer(sara_data, vectors_file, **settings)
    objective = trainer.state.objectives[0]
    offline = load_language_vectors(str(vectors_file))
    model = trainer.chunks[0].module
    means = []
    for _ in range(2):  # two steps' preparation on the same weights
        loaded = fetch_microbatches(trainer.state, trainer.plan.num_microbatches)
        means.append(_step_means(model, loaded))
        prepare_batch(trainer.state, trainer.cfg, loaded)
        vectors = objective.term.vectors
        assert vectors.normalisation == "sentence_l2"
        for lang in offline.vectors:
            seen = [m[lang] for m in means if lang in m]
            for slot, layer in enumerate(LAYERS):
                want = (sum(seen) / len(seen))[slot] if seen else offline.at(lang, layer)
                torch.testing.assert_close(vectors.at(lang, layer).double(), want.double(),
                                           rtol=1e-5, atol=1e-6, msg=(lang, layer))
    assert {"en", "hi"} <= set(means[0]) and len(set(means[0])) > 1

    trainer = _trainer(sara_data, vectors_file, **settings)
    trainer.run(max_steps=1)
    saved = trainer.state.objectives[0].online
    assert (tmp_path / "run" / "iter_0000001" / STATE_FILE).is_file()
    assert int(saved.counts.max()) == 1
    resumed = _trainer(sara_data, vectors_file, **settings)
    assert resumed.iteration == 1
    online = resumed.state.objectives[0].online
    assert torch.equal(online.sums, saved.sums) and torch.equal(online.counts, saved.counts)
    for lang in offline.vectors:
        assert torch.equal(resumed.state.objectives[0].term.vectors.vectors[lang],
                           trainer.state.objectives[0].term.vectors.vectors[lang])
