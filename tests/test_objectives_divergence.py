"""sara.divergence: KL(anchor ‖ target) and entropy-normalised JS beside the paper's JS.

Values against scipy's independent formulas, gradients against float64 finite differences, the
term inside the model against plain autograd, and the Triton kernel refused for the variants."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from sara_megatron.kernels.routing_js_reference import DIVERGENCES, sequence_routing_js_reference
from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import ModelOptions, build_model, causal_attention_mask
from sara_megatron.routing import observe_routers, segment_ids_from_padding_mask
from sara_megatron.sara import SaraRoutingLoss


def _scipy_divergence(kind, p, q):
    js = jensenshannon(p, q) ** 2  # natural log; scipy returns the distance (square root)
    if kind == "js":
        return js
    if kind == "kl":
        return entropy(p, q)
    return js / (0.5 * (entropy(p) + entropy(q)))


def _case(dtype, seed=0, layers=2, tokens=13, sequences=3, experts=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, tokens, experts, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, sequences, (tokens,), generator=g)
    ids[:2] = -1  # padding
    prior = torch.distributions.Dirichlet(torch.full((experts,), 0.7)).sample((layers, sequences))
    prior = prior.to(torch.float64 if dtype == torch.float64 else torch.float32)
    prior[0, 1, :2] = 0.0  # exact zeros in a prior
    prior = prior / prior.sum(-1, keepdim=True)  # in its own dtype: scipy renormalises
    return logits, ids, prior


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_values_match_scipy(kind):
    logits, ids, prior = _case(torch.float64)
    got = sequence_routing_js_reference(logits, ids, prior, divergence=kind)
    probs = torch.softmax(logits, -1).numpy()
    for layer in range(logits.shape[0]):
        for b in range(prior.shape[1]):
            rows = (ids == b).numpy()
            mean = probs[layer][rows].mean(0)
            want = _scipy_divergence(kind, prior[layer, b].numpy(), mean)
            assert got[layer, b].item() == pytest.approx(want, rel=1e-10, abs=1e-14), (layer, b)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradient_matches_float64_finite_differences(kind):
    logits, ids, prior = _case(torch.float64, seed=1)
    logits.requires_grad_(True)
    weights = torch.rand(prior.shape[:2], dtype=torch.float64)  # a non-uniform upstream gradient

    def loss(x):
        return (sequence_routing_js_reference(x, ids, prior, divergence=kind) * weights).sum()

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-8, rtol=1e-5)


def test_an_empty_sequence_gives_zero_and_no_gradient():
    logits, ids, prior = _case(torch.float64, seed=2)
    ids = torch.where(ids == 2, torch.zeros_like(ids), ids)  # sequence 2 has no token
    logits.requires_grad_(True)
    for kind in DIVERGENCES:
        values = sequence_routing_js_reference(logits, ids, prior, divergence=kind)
        assert torch.all(values[:, 2] == 0) and torch.all(values[:, :2] > 0), kind


def test_the_variants_differ_from_js_and_each_other():
    logits, ids, prior = _case(torch.float32, seed=3)
    values = {k: sequence_routing_js_reference(logits, ids, prior, divergence=k) for k in DIVERGENCES}
    assert all(torch.all(v >= 0) for v in values.values())
    assert torch.all(values["js"] <= np.log(2))
    assert not torch.allclose(values["js"], values["kl"])
    assert not torch.allclose(values["js"], values["js_entropy_normalised"])


@pytest.fixture(scope="module")
def model(single_rank):
    torch.manual_seed(0)
    m = build_model(get_preset("qwen3_moe_tiny"), ModelOptions(moe_aux_loss_coeff=0.0))
    m.train()
    return m


@pytest.mark.parametrize("kind", ["kl", "js_entropy_normalised"])
def test_in_model_gradient_matches_plain_autograd(model, kind):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    layers, lam, b, s = [1, 3], 0.7, 3, 10
    n = model.config.num_moe_experts
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 256, (b, s), generator=g)
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[2, 4:] = True
    priors = torch.distributions.Dirichlet(torch.full((n,), 0.5)).sample((len(layers), b))

    def run(observer):
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
        model.zero_grad(set_to_none=True)
        with observe_routers(model, observer):
            return model(tokens, torch.arange(s).expand(b, s), causal_attention_mask(s))

    term = SaraRoutingLoss(layers, lam, divergence=kind)
    term.set_batch(priors, segment_ids_from_padding_mask(padding))
    (run(term) * 0).sum().backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    kept = {}
    out = run(lambda layer, logits, pad: kept.__setitem__(layer, logits))
    valid = (~padding).t()  # [S, B]
    reference = 0.0
    for i, layer in enumerate(layers):
        probs = torch.softmax(kept[layer].double(), -1)  # [S, B, N]
        q = (probs * valid[..., None]).sum(0) / valid.sum(0)[:, None]
        p = priors[i].double()
        kl_pq = (p * (p.log() - q.log())).sum(-1)
        if kind == "kl":
            value = kl_pq
        else:
            m = 0.5 * (p + q)
            js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
            value = js / (0.5 * (-(p * p.log()).sum(-1) - (q * q.log()).sum(-1)))
        reference = reference + value.mean() / len(layers)
    (lam * reference + (out * 0).sum()).backward()
    want = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name].to(got[name].dtype), rtol=1e-4,
                                   atol=1e-7, msg=name)
    assert got["decoder.layers.1.mlp.router.weight"].abs().sum() > 0


def test_the_kernel_is_refused_for_the_variants():
    with pytest.raises(ValueError, match="JS only"):
        SaraRoutingLoss([0], 1.0, impl="triton", divergence="kl")
    with pytest.raises(ValueError, match="divergence must be one of"):
        SaraRoutingLoss([0], 1.0, divergence="hellinger")
    SaraRoutingLoss([0], 1.0, impl="auto", divergence="kl")  # auto: the reference


def test_config_accepts_the_variants_and_refuses_the_kernel_with_them():
    from sara_megatron.training.config import ConfigError, load_train_config

    assert load_train_config(None, ["sara.divergence=kl"]).sara.divergence == "kl"
    with pytest.raises(ConfigError, match="sara.divergence must be one of"):
        load_train_config(None, ["sara.divergence=tv"])
    with pytest.raises(ConfigError, match="JS only"):
        load_train_config(None, ["sara.divergence=js_entropy_normalised", "sara.impl=triton"])
