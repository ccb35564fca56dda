"""AES baseline: the variance and orthogonality terms inside the model against plain autograd
through an independent formula (Gram–Schmidt on per-token expert outputs recomputed from the
expert weights), zero coefficients reproduce FFT exactly, the self-calibration rule, and a packed
step (data.packing) equal to the padded one, calibration included."""

import pytest
import torch
import torch.nn.functional as F

import launch

from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import ModelOptions, build_model, causal_attention_mask
from sara_megatron.routing import observe_routers
from sara_megatron.sara.aes import AesLoss, orthogonality_per_token

B, S = 2, 8
W_VAR, W_ORTH = 3.0, 50.0


def _gram_schmidt_projection(outputs):
    """[T, k, H] -> [T]: the mean over i of Σ over an orthonormal Gram–Schmidt basis u of the
    other outputs of ‖(u·y_i) u‖², written token by token."""
    t, k, _ = outputs.shape
    result = []
    for token in range(t):
        total = 0.0
        for i in range(k):
            basis = []
            for j in range(k):
                if j == i:
                    continue
                v = outputs[token, j]
                for u in basis:
                    v = v - (u @ v) * u
                basis.append(v / v.norm())
            total = total + sum(((u @ outputs[token, i]) * u).pow(2).sum() for u in basis)
        result.append(total / k)
    return torch.stack(result)


def test_orthogonality_matches_gram_schmidt():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(5, 4, 7, generator=g, dtype=torch.float64)
    outputs[1, 3] = outputs[1, 0] * 2 + 0.1 * outputs[1, 3]  # two nearly parallel outputs
    got = orthogonality_per_token(outputs)
    torch.testing.assert_close(got, _gram_schmidt_projection(outputs).float(), rtol=1e-5, atol=1e-6)
    assert got[1] > got[0]
    assert torch.all(orthogonality_per_token(outputs[:, :1]) == 0)  # top-1: no other expert


def _orthogonality_by_qr(outputs):
    """The plain QR form of the orthogonality value (no guard for zero slots)."""
    t, k, _ = outputs.shape
    total = outputs.new_zeros(t)
    for i in range(k):
        others = torch.cat([outputs[:, :i], outputs[:, i + 1:]], dim=1)
        basis, _ = torch.linalg.qr(others.transpose(1, 2))
        total = total + torch.einsum("thj,th->tj", basis, outputs[:, i]).pow(2).sum(-1)
    return total / k


def test_a_zero_slot_keeps_value_and_gradient_finite():
    """An all-zero expert-output slot (an undispatched padding token) made the QR's backward NaN,
    even for a token masked out after the QR. Now: finite forward and gradient, the zero slot
    spans nothing (Gram–Schmidt's value), the other tokens' values are the plain QR's exactly."""
    g = torch.Generator().manual_seed(3)
    normal = torch.randn(6, 3, 16, generator=g)
    assert torch.equal(orthogonality_per_token(normal), _orthogonality_by_qr(normal))

    outputs = normal.clone()
    outputs[2, 1] = 0.0  # a real token with one zero slot
    outputs[4] = 0.0  # a padding token: every slot zero
    outputs.requires_grad_(True)
    valid = torch.tensor([True, True, True, True, False, True])
    plain = torch.where(valid, _orthogonality_by_qr(outputs), 0.0).sum()
    plain.backward()
    assert not torch.isfinite(outputs.grad).all()  # what the guard is for
    outputs.grad = None
    values = orthogonality_per_token(outputs)
    torch.where(valid, values, 0.0).sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(outputs.grad).all()
    keep = torch.tensor([0, 1, 3, 5])
    assert torch.equal(values.detach()[keep], _orthogonality_by_qr(normal)[keep])
    torch.testing.assert_close(values.detach()[[2, 4]],
                               torch.stack([_gram_schmidt_projection(outputs.detach()[2:3, [0, 2]])[0]
                                            * 2 / 3, torch.tensor(0.0)]))
    assert outputs.grad[4].abs().sum() == 0 and outputs.grad[2].abs().sum() > 0


@pytest.fixture(scope="module")
def model(single_rank):
    torch.manual_seed(0)
    m = build_model(get_preset("qwen3_moe_tiny"), ModelOptions(moe_aux_loss_coeff=0.0))
    m.train()
    return m


def _moe_layers(model):
    return [m for m in model.modules() if hasattr(m, "token_dispatcher") and hasattr(m, "experts")]


def test_gradient_matches_plain_autograd(model):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 256, (B, S), generator=g)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, 5:] = True
    positions = torch.arange(S).expand(B, S)

    def run(observer):
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
        model.zero_grad(set_to_none=True)
        with observe_routers(model, observer):
            return model(tokens, positions, causal_attention_mask(S), padding_mask=padding)

    aes = AesLoss(W_VAR, W_ORTH)
    handles = aes.attach([model])
    try:
        (run(aes) * 0).sum().backward()
    finally:
        for h in handles:
            h.remove()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    # Reference: each MoE layer's input and router logits, kept with their graph.
    inputs, logits = {}, {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args: inputs.__setitem__(mod.router.global_layer_index, args[0]))
        for m in _moe_layers(model)]
    try:
        out = run(lambda layer, lg, pad: logits.__setitem__(layer, lg))
    finally:
        for h in hooks:
            h.remove()
    valid = (~padding).t().reshape(-1)  # [S·B], megatron's token order
    k = model.config.moe_router_topk
    reference = 0.0
    for moe in _moe_layers(model):
        layer = moe.router.global_layer_index
        lg = logits[layer].reshape(-1, logits[layer].shape[-1]).float()
        hidden = inputs[layer].reshape(-1, inputs[layer].shape[-1])
        variance = torch.softmax(lg, -1).var(-1)
        chosen = lg.topk(k, dim=-1).indices.sort(dim=-1).values  # [T, k], by expert id
        outputs = []
        for e_slot in range(k):
            rows = []
            for t in range(hidden.shape[0]):
                expert = moe.experts.local_experts[int(chosen[t, e_slot])]
                gate, up = F.linear(hidden[t], expert.linear_fc1.weight).chunk(2)
                rows.append(F.linear(F.silu(gate) * up, expert.linear_fc2.weight))
            outputs.append(torch.stack(rows))
        ortho = _gram_schmidt_projection(torch.stack(outputs, dim=1).float())
        n = valid.sum()
        reference = reference - W_VAR * variance[valid].sum() / n + W_ORTH * ortho[valid].sum() / n
    (reference + (out * 0).sum()).backward()
    want = {k_: p.grad for k_, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-4, atol=1e-8, msg=name)
    assert got["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"].abs().sum() > 0
    assert got["decoder.layers.0.mlp.router.weight"].abs().sum() > 0


def test_calibration_is_a_power_of_ten():
    aes = AesLoss(None, 5.0, variance_target=1e-3)
    aes.calibrate_from({"variance": {0: 4e-4, 1: 6e-4}, "orthogonality": {0: 1.0}})
    assert aes.variance_coeff == 1.0 and aes.orthogonality_coeff == 5.0  # 1e-3/5e-4 = 2 -> 10^0
    aes = AesLoss(None, None)
    aes.calibrate_from({"variance": {0: 4e-6}, "orthogonality": {0: 2.7e-7}})
    assert aes.variance_coeff == 100.0 and aes.orthogonality_coeff == 1000.0


def _mock_step(objective_overrides):
    from sara_megatron.training import Trainer, load_train_config

    cfg = load_train_config(None, [
        "model.preset=qwen3_moe_tiny", "data.mock=true", "data.seq_length=16",
        "data.micro_batch_size=2", "data.global_batch_size=4", "optim.train_steps=1",
        "sara.layers=all", *objective_overrides])
    trainer = Trainer(cfg)
    record = trainer.train_step()
    grads = {n: p.main_grad.detach().clone() for n, p in trainer.chunks[0].module.named_parameters()}
    return record, grads, trainer._sara_settings()


def test_zero_coefficients_reproduce_fft_exactly(single_rank):
    fft, fft_grads, fft_settings = _mock_step(["sara.lambda_js=0"])
    aes, aes_grads, aes_settings = _mock_step(["sara.objective=aes", "aes.variance_coeff=0",
                                               "aes.orthogonality_coeff=0"])
    # Checkpoints record the objective (a resume into another one warns); SARA's record is as
    # it always was.
    assert fft_settings == {"lambda_js": 0.0, "alignment_layers": [0, 1, 2, 3]}
    assert aes_settings == {"lambda_js": 0.0, "alignment_layers": [], "objective": "aes"}
    assert aes.ce == fft.ce and aes.lb == fft.lb and aes.grad_norm == fft.grad_norm
    assert aes.terms["aes_variance"] > 0 and aes.terms["aes_orthogonality"] > 0
    for name in fft_grads:
        assert torch.equal(aes_grads[name], fft_grads[name]), name
    calibrated, _, _ = _mock_step(["sara.objective=aes"])
    assert calibrated.grad_norm != fft.grad_norm
    # The calibration's forward pass does not count in the step's logged LB.
    assert calibrated.lb == fft.lb


def test_another_dispatcher_is_refused(single_rank):
    """The alltoall dispatcher (megatron's GPU default) cannot be built on CPU (CUDA streams);
    any dispatcher other than allgather is refused the same way."""
    model = build_model(get_preset("qwen3_moe_tiny"))
    _moe_layers(model)[0].token_dispatcher = type("MoEAlltoAllTokenDispatcher", (), {})()
    with pytest.raises(ValueError, match="model.token_dispatcher: allgather"):
        AesLoss(1.0, 1.0).attach([model])


def _packing_trainer(data, packing: str, **extra):
    """A tiny AES run on the fixture's shards (packing needs real shards, not data.mock)."""
    from sara_megatron.training import Trainer, load_train_config

    values = {"model.preset": "qwen3_moe_tiny", "model.checkpoint": data["checkpoint"],
              "data.shards_dir": data["shards"], "data.seq_length": 128,
              "data.micro_batch_size": 1, "data.global_batch_size": 6, "data.packing": packing,
              "optim.train_steps": 1, "sara.layers": "all", "sara.objective": "aes",
              # LB is a statistic of each micro-batch's tokens, which packing regroups
              "model.moe_aux_loss_coeff": 0.0, **extra}
    trainer = Trainer(load_train_config(None, [f"{k}={v}" for k, v in values.items()]))
    return trainer, launch.record_micro_batches(trainer)


def test_a_packed_step_is_the_padded_step(single_rank, sara_data):
    """AES's terms are per token over non-padding tokens: a packed step (several samples per row,
    padding only at the rows' ends) has the padded step's CE, variance and orthogonality terms and
    gradients (fp32), with the coefficients set, large enough that each AES term moves the gradients
    about as much as the CE does."""
    runs = {}
    for packing in ("false", "true"):
        trainer, seen = _packing_trainer(sara_data, packing, **{
            "aes.variance_coeff": 100.0, "aes.orthogonality_coeff": 1e5})
        record = trainer.train_step()
        grads = {n: p.main_grad.detach().clone()
                 for n, p in trainer.chunks[0].module.named_parameters()}
        runs[packing] = (record, grads, seen)
    padded, padded_grads, padded_mbs = runs["false"]
    packed, packed_grads, packed_mbs = runs["true"]
    samples = [sorted(s for mb in mbs for s in zip(mb.languages, mb.sample_ids))
               for mbs in (padded_mbs, packed_mbs)]
    assert samples[0] == samples[1] and len(samples[0]) == 6
    assert len(packed_mbs) < len(padded_mbs)
    assert any(len(row[row >= 0].unique()) > 1 for mb in packed_mbs for row in mb.segment_ids)
    assert packed.ce == pytest.approx(padded.ce, rel=1e-6)
    for term in ("aes_variance", "aes_orthogonality"):
        assert packed.terms[term] == pytest.approx(padded.terms[term], rel=1e-5), term
        assert packed.terms[term] > 0
    assert packed.grad_norm == pytest.approx(padded.grad_norm, rel=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_packed_calibration_is_the_padded_calibration(single_rank, sara_data):
    """Unset coefficients are calibrated on the first global batch from token means over its
    non-padding tokens: packed, the same layer means and coefficients as padded."""
    runs = {}
    for packing in ("false", "true"):
        trainer, _ = _packing_trainer(sara_data, packing)
        aes = trainer.state.objectives[0].loss
        assert not aes.calibrated
        means = []
        calibrate_from = aes.calibrate_from
        aes.calibrate_from = lambda m: (means.append(m), calibrate_from(m))
        record = trainer.train_step()
        runs[packing] = (means, aes.variance_coeff, aes.orthogonality_coeff, record)
    (padded_means,), *padded_coeffs, padded = runs["false"]
    (packed_means,), *packed_coeffs, packed = runs["true"]
    assert packed_coeffs == padded_coeffs and all(c > 0 for c in packed_coeffs)
    for term in ("variance", "orthogonality"):
        assert sorted(packed_means[term]) == sorted(padded_means[term]) == [0, 1, 2, 3]
        for layer, value in padded_means[term].items():
            assert packed_means[term][layer] == pytest.approx(value, rel=1e-5), (term, layer)
    assert packed.grad_norm == pytest.approx(padded.grad_norm, rel=1e-5)


def test_authors_calibration_is_the_first_layer_and_its_router_rows(single_rank):
    """aes.calibration: authors, against the released code's rule written out here: the first
    MoE layer's routing-score variance (token mean, first micro-batch) and, for the
    orthogonality, each of the router's first k weight rows projected onto the span of the other
    rows (least squares, not QR), each coefficient 10^round(log10(target / value)). Both
    candidates are measured whichever is used."""
    import math

    from sara_megatron.training import Trainer, load_train_config

    cfg = load_train_config(None, [
        "model.preset=qwen3_moe_tiny", "data.mock=true", "data.seq_length=16",
        "data.micro_batch_size=2", "data.global_batch_size=4", "optim.train_steps=1",
        "sara.layers=all", "sara.objective=aes", "aes.calibration=authors"])
    trainer = Trainer(cfg)
    model = trainer.chunks[0].module
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = launch.record_micro_batches(trainer)
    trainer.train_step()
    aes = trainer.state.objectives[0].loss
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])

    first = min(_moe_layers(model), key=lambda m: m.router.global_layer_index)
    weight = first.router.weight.detach().double()  # [N, H]
    k = first.router.topk
    orthogonality = 0.0
    for i in range(k):
        others = torch.cat([weight[:i], weight[i + 1:]])
        coefficients = torch.linalg.lstsq(others.t(), weight[i, :, None]).solution
        orthogonality += float((others.t() @ coefficients).pow(2).sum()) / k

    mb = seen[0]
    kept = {}
    hook = first.register_forward_pre_hook(lambda mod, args: kept.__setitem__("h", args[0]))
    b, s = mb.tokens.shape
    with torch.no_grad():
        model(mb.tokens, torch.arange(s).expand(b, s), causal_attention_mask(s),
              padding_mask=mb.padding_mask)
    hook.remove()
    hidden = kept["h"].reshape(-1, kept["h"].shape[-1]).float()
    scores = torch.softmax(hidden @ first.router.weight.detach().float().t(), dim=-1)
    valid = (~mb.padding_mask).t().reshape(-1)
    variance = float(scores.var(dim=-1)[valid].mean())

    values = aes.calibration_values
    assert set(values) == {"measured", "authors"}
    assert values["authors"]["variance"] == pytest.approx(variance, rel=1e-5)
    assert values["authors"]["orthogonality"] == pytest.approx(orthogonality, rel=1e-6)
    assert aes.variance_coeff == 10.0 ** round(math.log10(1e-3 / variance))
    assert aes.orthogonality_coeff == 10.0 ** round(math.log10(1e-4 / orthogonality))
    # The measured candidate reads every layer's expert outputs: another value.
    assert values["measured"]["orthogonality"] != pytest.approx(orthogonality, rel=1e-2)


def test_calibration_setting_is_checked():
    from sara_megatron.training.config import ConfigError, load_train_config

    assert load_train_config(None, []).aes.calibration == "measured"
    with pytest.raises(ConfigError, match="aes.calibration must be one of measured, authors"):
        load_train_config(None, ["aes.calibration=paper"])
