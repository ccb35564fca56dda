"""The forward runner (routing/forward_runner.py): stopping after layer L gives the full
forward's routing and hidden states for every layer up to L and runs nothing past it; the model is
left as it was; padding follows the longrope rule training follows."""

import contextlib

import numpy as np
import pytest
import torch

from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model
from sara_megatron.routing import capture_routing
from sara_megatron.routing.forward_runner import ForwardRunner, lay_out_rows
from sara_megatron.sara.shifcon import transformer_layers


def _rows(packed: bool):
    gen = np.random.default_rng(0)
    lengths = [[9, 5], [13], [3, 4, 2]] if packed else [[11], [6], [16]]
    rows = [[gen.integers(1, 200, n) for n in row] for row in lengths]
    return lay_out_rows(rows, 16, packed)


def _observed_forward(model, rows, stop_after):
    """{layer: routing sequence means [n, N]}, {layer: hidden state entering it [S, B, H]},
    the layers whose forward ran."""
    routing, hidden, ran = {}, {}, []
    layers = transformer_layers([model])
    handles = [module.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: hidden.__setitem__(
            i, (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()),
        with_kwargs=True) for i, module in layers.items()]
    handles += [module.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
                for i, module in layers.items()]

    @contextlib.contextmanager
    def observe(index, inputs, view):
        with capture_routing(model, inputs.segment_ids, num_segments=view.samples,
                             keep_probs=False) as capture:
            yield
        routing.update({layer: record.seq_mean.clone()
                        for layer, record in capture.records.items()})

    try:
        ForwardRunner([model], "cpu").run([rows], observe, stop_after=stop_after)
    finally:
        for handle in handles:
            handle.remove()
    return routing, hidden, ran


@pytest.mark.parametrize("packed", [False, True])
def test_stopping_after_a_layer_keeps_the_layers_before_it(single_rank, packed):
    torch.manual_seed(0)
    model = build_model(get_preset("qwen3_moe_tiny"))
    model.train()
    rows = _rows(packed)
    full_routing, full_hidden, full_ran = _observed_forward(model, rows, None)
    assert full_ran == [0, 1, 2, 3]
    for last in (0, 1, 2):
        routing, hidden, ran = _observed_forward(model, rows, last)
        assert ran == list(range(last + 1))  # nothing past the last layer runs
        assert sorted(routing) == list(range(last + 1))
        for layer in range(last + 1):
            torch.testing.assert_close(routing[layer], full_routing[layer], rtol=0, atol=0)
            torch.testing.assert_close(hidden[layer], full_hidden[layer], rtol=0, atol=0)
    # The model is whole again and back in its mode.
    assert model.training and len(model.decoder.layers) == 4
    assert model.post_process and model.decoder.final_layernorm is not None
    _, _, ran = _observed_forward(model, rows, None)
    assert ran == [0, 1, 2, 3]


def test_a_stopped_forward_refuses_a_loss(single_rank):
    model = build_model(get_preset("qwen3_moe_tiny"))
    with pytest.raises(ValueError, match="no output layer"):
        ForwardRunner([model], "cpu").run([_rows(False)], stop_after=1,
                                          loss=lambda index, rows, t: t.sum())


def test_padding_follows_training_past_the_longrope_switch(single_rank):
    # The tiny Phi switches to the long factors past 64 padded positions: a batch of short rows
    # is padded past the switch when training (128) is, to its own length when training is not.
    phi = build_model(get_preset("phi35_moe_tiny"))
    switch = get_preset("phi35_moe_tiny").longrope.original_max_position_embeddings
    assert ForwardRunner([phi], "cpu", train_length=128, pad_multiple=8).padded_length(10) == \
        -(-(switch + 1) // 8) * 8
    assert ForwardRunner([phi], "cpu", train_length=64, pad_multiple=8).padded_length(10) == 16
    qwen = build_model(get_preset("qwen3_moe_tiny"))  # no length-dependent rope
    assert ForwardRunner([qwen], "cpu", train_length=128, pad_multiple=8).padded_length(10) == 16
    # A multiple that cannot reach training's side of the switch is refused.
    with pytest.raises(ValueError, match="longrope switch"):
        ForwardRunner([phi], "cpu", train_length=64, pad_multiple=96).padded_length(10)
