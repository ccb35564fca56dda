"""The SARA JS term inside the model: gradients vs plain autograd through an independent formula."""

import pytest
import torch

from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import ModelOptions, build_model, causal_attention_mask
from sara_megatron.routing import observe_routers, segment_ids_from_padding_mask
from sara_megatron.sara import SaraRoutingLoss, select_alignment_layers

B, S = 3, 10
LAYERS = [1, 3]
LAMBDA = 1.5


@pytest.fixture(scope="module")
def model(single_rank):
    torch.manual_seed(0)
    # No load-balancing term: the only injected gradient is SARA's.
    m = build_model(get_preset("qwen3_moe_tiny"), ModelOptions(moe_aux_loss_coeff=0.0))
    m.train()
    return m


def _inputs(num_experts):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (B, S), generator=g)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, 6:] = True
    priors = torch.distributions.Dirichlet(torch.full((num_experts,), 0.5)).sample((len(LAYERS), B))
    priors[0, 2, :3] = 0.0  # exact zeros in a prior
    priors = priors / priors.sum(-1, keepdim=True)
    return tokens, padding, priors


def _js(p, q):
    m = 0.5 * (p + q)
    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log()), 0.0).sum(-1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, tokens, observer):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))  # the shape megatron's schedules use
    model.zero_grad(set_to_none=True)
    with observe_routers(model, observer):
        out = model(tokens, torch.arange(S).expand(B, S), causal_attention_mask(S))
    return out


def test_js_gradient_matches_autograd_reference(model):
    n = model.config.num_moe_experts
    tokens, padding, priors = _inputs(n)
    seg = segment_ids_from_padding_mask(padding)

    sara = SaraRoutingLoss(LAYERS, LAMBDA)
    sara.set_batch(priors, seg)
    out = _run(model, tokens, sara)
    (out * 0).sum().backward()  # only the attached SARA term injects gradient
    got = _grads(model)

    kept = {}
    def keep_logits(layer, logits, padding_mask):
        kept[layer] = logits
        return None
    out = _run(model, tokens, keep_logits)
    valid = ~padding.t()  # [S, B]
    reference = 0.0
    for i, layer in enumerate(LAYERS):
        probs = torch.softmax(kept[layer].float(), dim=-1)  # [S, B, N]
        mean = (probs * valid[..., None]).sum(0) / valid.sum(0)[:, None]
        reference = reference + _js(priors[i], mean).mean() / len(LAYERS)
    (LAMBDA * reference + (out * 0).sum()).backward()
    want = _grads(model)

    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    routers = [f"decoder.layers.{l}.mlp.router.weight" for l in LAYERS]
    assert all(want[r].abs().sum() > 0 for r in routers)
    # The head sits after every aligned layer: SARA gives it exactly nothing.
    assert torch.count_nonzero(got["output_layer.weight"]) == 0


def test_lambda_zero_adds_nothing(model):
    n = model.config.num_moe_experts
    tokens, padding, priors = _inputs(n)
    sara = SaraRoutingLoss(LAYERS, 0.0)
    sara.set_batch(priors, segment_ids_from_padding_mask(padding))
    out = _run(model, tokens, sara)
    out.float().pow(2).mean().backward()
    with_zero = _grads(model)
    out = _run(model, tokens, lambda *a: None)
    out.float().pow(2).mean().backward()
    plain = _grads(model)
    for name in plain:
        assert torch.equal(with_zero[name], plain[name]), name
    # The term is still computed (for logging) even at λ = 0.
    means = sara.layer_means()
    assert sorted(means) == LAYERS and all(v > 0 for v in means.values())


def test_bad_batches_are_refused():
    sara = SaraRoutingLoss(LAYERS, 1.0)
    with pytest.raises(ValueError, match="L_sel=2"):
        sara.set_batch(torch.rand(3, B, 8), torch.zeros(B, S, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        sara.set_batch(torch.rand(2, B, 8), torch.full((B, S), 3))
    with pytest.raises(ValueError, match="at least one"):
        SaraRoutingLoss([], 1.0)


def test_layer_selection():
    assert select_alignment_layers(48, family="qwen3_moe") == list(range(7, 35))
    assert select_alignment_layers(32, family="phimoe") == list(range(13, 27))
    assert select_alignment_layers(4, "all") == [0, 1, 2, 3]
    r1 = select_alignment_layers(48, "random", family="qwen3_moe", seed=5)
    assert len(r1) == 28 and r1 == select_alignment_layers(48, "random", family="qwen3_moe", seed=5)
    assert r1 != select_alignment_layers(48, "random", family="qwen3_moe", seed=6)
    with pytest.raises(ValueError, match="does not fit"):
        select_alignment_layers(4, family="qwen3_moe")
