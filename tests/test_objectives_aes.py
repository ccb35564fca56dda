"""AES baseline: the variance and orthogonality terms inside the model against plain autograd
through an independent formula (Gram–Schmidt on per-token expert outputs recomputed from the
expert weights), zero coefficients reproduce FFT exactly, and the self-calibration rule."""

import pytest
import torch
import torch.nn.functional as F

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
    with pytest.raises(NotImplementedError, match="model.token_dispatcher: allgather"):
        AesLoss(1.0, 1.0).attach([model])
