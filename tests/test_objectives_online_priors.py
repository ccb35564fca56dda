"""sara.priors online: each micro-batch carries its samples' anchor rows and the anchor forward
runs in the same step; at step 0 those priors are the store's (same model, same samples), and the
step trains like the store-based one. With data.packing the anchors are packed too (their own
rows, segment k = sample k): the priors are still the store's, and a packed step is the padded
step."""

import numpy as np
import pytest
import torch

from sara_megatron.data.anchor_rows import pack_anchor_rows
from sara_megatron.priors.store import PriorStore
from sara_megatron.sara.online_priors import online_anchor_priors
from sara_megatron.training import Trainer, load_train_config
from sara_megatron.training.config import ConfigError


def _config(data, **extra):
    values = {
        "model.preset": "qwen3_moe_tiny", "model.checkpoint": data["checkpoint"],
        "data.shards_dir": data["shards"], "data.prior_store": data["priors"],
        "data.seq_length": 64, "data.micro_batch_size": 4, "data.global_batch_size": 8,
        "sara.layers": "all", "optim.lr": 1e-3, "optim.train_steps": 2,
    }
    values.update(extra)
    return load_train_config(None, [f"{k}={'null' if v is None else v}" for k, v in values.items()])


def test_online_priors_equal_the_store_at_step_0(single_rank, sara_data):
    trainer = Trainer(_config(sara_data, **{"sara.priors": "online", "data.prior_store": None}))
    microbatches = trainer._next_microbatches()
    assert all(mb.priors is None for mb in microbatches)
    priors = online_anchor_priors(trainer.chunks, microbatches, trainer.alignment_layers,
                                  trainer.arch.num_experts, trainer.device)
    assert all(chunk.training for chunk in trainer.chunks)  # back in training mode
    store = PriorStore(sara_data["priors"])
    shards_anchor = "en"
    for mb, online in zip(microbatches, priors):
        assert set(mb.languages) <= {"hi", "sw"} and shards_anchor not in mb.languages
        assert not torch.equal(mb.anchor_tokens, mb.tokens)  # the anchors, not the targets
        stored = store.read(mb.sample_ids, trainer.alignment_layers)  # [L, B, N]
        torch.testing.assert_close(online, stored.to(online.dtype), rtol=0, atol=2e-6)


def test_an_online_step_trains_like_the_store_step_at_step_0(single_rank, sara_data):
    online = Trainer(_config(sara_data, **{"sara.priors": "online", "data.prior_store": None}))
    record_online = online.train_step()
    store = Trainer(_config(sara_data))
    record_store = store.train_step()
    assert record_online.js > 0
    assert record_online.ce == pytest.approx(record_store.ce, rel=1e-6)
    assert record_online.js == pytest.approx(record_store.js, rel=1e-4)
    assert record_online.grad_norm == pytest.approx(record_store.grad_norm, rel=1e-4)
    # Step 1 takes priors from the updated model: they move with it, the store's do not.
    mbs = online._next_microbatches()
    moved = online_anchor_priors(online.chunks, mbs, online.alignment_layers,
                                 online.arch.num_experts, online.device)[0]
    stored = PriorStore(sara_data["priors"]).read(mbs[0].sample_ids, online.alignment_layers)
    assert (moved - stored).abs().max() > 1e-4


def test_packed_anchor_segments_are_the_samples_order():
    """First-fit decreasing puts anchor 1 (longest) in row 0 and anchors 0 and 2 in row 1;
    segment k is still anchor k, with positions from 0 within it."""
    anchors = [np.arange(100, 103), np.arange(200, 210), np.arange(300, 304)]
    rows = pack_anchor_rows(anchors, seq_length=12, pad_id=0)
    assert rows.tokens.shape == (2, 12)
    assert rows.segment_ids[0, 0] == 1 and rows.segment_ids[1, 0] == 0
    for k, anchor in enumerate(anchors):
        where = rows.segment_ids == k
        assert rows.tokens[where].tolist() == anchor.tolist()
        assert rows.position_ids[where].tolist() == list(range(len(anchor)))
    assert torch.equal(rows.padding_mask, rows.segment_ids < 0)
    assert int(rows.padding_mask.sum()) == 2 * 12 - 17


# At rows of 96 tokens one micro-batch's anchors need two rows where its samples fill one.
PACKED = {"sara.priors": "online", "data.prior_store": None, "data.seq_length": 96,
          "data.micro_batch_size": 1, "data.global_batch_size": 8, "data.packing": "true"}


def test_packed_online_priors_equal_the_store_at_step_0(single_rank, sara_data):
    trainer = Trainer(_config(sara_data, **PACKED))
    microbatches = trainer._next_microbatches()
    priors = online_anchor_priors(trainer.chunks, microbatches, trainer.alignment_layers,
                                  trainer.arch.num_experts, trainer.device)
    store = PriorStore(sara_data["priors"])
    anchors_per_row, more_anchor_rows = [], False
    for mb, online in zip(microbatches, priors):
        n = len(mb.sample_ids)
        assert mb.segment_ids is not None and int(mb.anchor_segment_ids.max()) == n - 1
        assert online.shape[1] == n  # one prior per sample, not per row
        more_anchor_rows |= mb.anchor_tokens.shape[0] > mb.tokens.shape[0]
        anchors_per_row += [len(set(r[r >= 0].tolist())) for r in mb.anchor_segment_ids]
        stored = store.read(mb.sample_ids, trainer.alignment_layers)  # [L, n, N]
        torch.testing.assert_close(online, stored.to(online.dtype), rtol=0, atol=2e-6)
    assert max(anchors_per_row) > 1  # the anchors really share rows
    # Some anchors fill more rows than their samples: the schedule runs them padded to a common
    # row count.
    assert more_anchor_rows


def test_a_packed_online_step_is_the_padded_online_step(single_rank, sara_data):
    """Same samples: CE, JS and gradients as padded (LB regroups with the micro-batches: off)."""
    runs = {}
    for packing in ("false", "true"):
        config = {**PACKED, "data.packing": packing, "model.moe_aux_loss_coeff": 0.0,
                  "optim.train_steps": 1}
        if packing == "false":
            config["data.micro_batch_size"] = 4
        trainer = Trainer(_config(sara_data, **config))
        record = trainer.train_step()
        grads = {n: p.main_grad.detach().clone()
                 for n, p in trainer.chunks[0].module.named_parameters()}
        runs[packing] = (record, grads)
    (padded, padded_grads), (packed, packed_grads) = runs["false"], runs["true"]
    assert packed.js > 0
    assert packed.ce == pytest.approx(padded.ce, rel=1e-6)
    assert packed.js == pytest.approx(padded.js, rel=1e-5)
    assert packed.grad_norm == pytest.approx(padded.grad_norm, rel=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_online_priors_settings_are_checked(single_rank, sara_data):
    with pytest.raises(ConfigError, match="leave data.prior_store unset"):
        _config(sara_data, **{"sara.priors": "online"})
    with pytest.raises(ConfigError, match="sara.priors must be one of"):
        _config(sara_data, **{"sara.priors": "live"})
