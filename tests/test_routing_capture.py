"""Dense routing capture vs an independent recomputation from router weights and hidden states."""

import pytest
import torch

from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model, causal_attention_mask
from sara_megatron.routing import capture_routing, observe_routers, segment_ids_from_padding_mask
from sara_megatron.routing.observers import model_routers

B, S = 3, 12


@pytest.fixture(scope="module")
def model(single_rank):
    torch.manual_seed(0)
    m = build_model(get_preset("qwen3_moe_tiny"))
    m.eval()
    return m


def _batch(vocab):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (B, S), generator=g)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, 8:] = True
    padding[2, 5:] = True
    return tokens, padding


def _forward(model, tokens):
    positions = torch.arange(S).expand(B, S)
    return model(tokens, positions, causal_attention_mask(S))


def test_capture_matches_recomputation_from_router_inputs(model):
    tokens, padding = _batch(256)
    moe_inputs = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda mod, args, i=i: moe_inputs.__setitem__(i, args[0].detach().clone())
        )
        for i, layer in enumerate(model.decoder.layers)
    ]
    try:
        with capture_routing(model, segment_ids_from_padding_mask(padding), layers=[1, 3]) as cap:
            _forward(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(cap.records) == [1, 3]
    for layer in (1, 3):
        hidden = moe_inputs[layer].double()  # [S, B, H]
        weight = model.decoder.layers[layer].mlp.router.weight.double()
        logits = hidden @ weight.T  # [S, B, N]
        probs = torch.softmax(logits, dim=-1)
        rec = cap[layer]
        torch.testing.assert_close(rec.logits.double(), logits.reshape(S * B, -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.probs.double(), probs.reshape(S * B, -1), rtol=1e-5, atol=1e-6)
        for b in range(B):
            valid = ~padding[b]
            expected = probs[:, b][valid].mean(0)
            torch.testing.assert_close(rec.seq_mean[b].double(), expected, rtol=1e-5, atol=1e-6)
            assert rec.token_count[b].item() == valid.sum().item()
        assert rec.probs.dtype == torch.float32 and rec.seq_mean.dtype == torch.float32


def test_padding_tokens_are_excluded(model):
    tokens, padding = _batch(256)
    seg = segment_ids_from_padding_mask(padding)
    with capture_routing(model, seg, layers=[2]) as first:
        _forward(model, tokens)
    # Right padding: under causal attention, changing what sits in the padding changes the
    # padding tokens' routing only; a masked mean must not move.
    changed = torch.where(padding, (tokens + 17) % 256, tokens)
    with capture_routing(model, seg, layers=[2]) as second:
        _forward(model, changed)
    assert not torch.allclose(first[2].probs, second[2].probs)
    torch.testing.assert_close(first[2].seq_mean, second[2].seq_mean, rtol=0, atol=1e-6)
    # And the mean over all tokens differs, so the mask is doing the work.
    unmasked = first[2].probs.reshape(S, B, -1)[:, 0].mean(0)
    assert not torch.allclose(unmasked, first[2].seq_mean[0], atol=1e-4)


def test_output_unchanged_with_capture(model):
    tokens, padding = _batch(256)
    plain = _forward(model, tokens)
    with capture_routing(model, segment_ids_from_padding_mask(padding)) as cap:
        captured = _forward(model, tokens)
    assert sorted(cap.records) == [0, 1, 2, 3]
    assert torch.equal(plain, captured)


def test_empty_sequence_reported(model):
    tokens, padding = _batch(256)
    padding[1] = True
    with capture_routing(model, segment_ids_from_padding_mask(padding), layers=[0]) as cap:
        _forward(model, tokens)
    assert cap[0].empty.tolist() == [False, True, False]
    assert torch.all(cap[0].seq_mean[1] == 0)


def test_capture_rejects_wrong_segment_ids(model):
    tokens, _ = _batch(256)
    with pytest.raises(ValueError, match="local tokens"):
        with capture_routing(model, torch.zeros(B, S + 1, dtype=torch.long), layers=[0]):
            _forward(model, tokens)
    with pytest.raises(KeyError, match="not captured"):
        with capture_routing(model, torch.zeros(B, S, dtype=torch.long), layers=[0]) as cap:
            _forward(model, tokens)
        cap[3]


def test_observers_belong_to_the_model_they_are_installed_on(model):
    """Two models in one process: an observer installed on one is never called by the other's
    forward, and is gone from the routers once its block ends."""
    torch.manual_seed(1)
    other = build_model(get_preset("qwen3_moe_tiny")).eval()
    tokens, _ = _batch(256)
    seen = {"model": [], "other": []}

    def observer(name):
        return lambda layer, logits, padding_mask: seen[name].append(layer)

    with observe_routers(model, observer("model")):
        _forward(other, tokens)
        assert seen == {"model": [], "other": []}
        _forward(model, tokens)
        assert seen["model"] == [0, 1, 2, 3]
        with observe_routers(other, observer("other")):
            _forward(other, tokens)
        assert seen == {"model": [0, 1, 2, 3], "other": [0, 1, 2, 3]}
    assert all(r.router_observers == () for m in (model, other) for r in model_routers(m))
    _forward(model, tokens)
    assert seen["model"] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="no observable routers"):
        with observe_routers(torch.nn.Linear(2, 2), observer("model")):
            pass
