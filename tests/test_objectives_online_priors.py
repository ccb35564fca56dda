"""sara.priors online: each micro-batch carries its samples' anchor rows and the anchor forward
runs in the same step; at step 0 those priors are the store's (same model, same samples), and the
step trains like the store-based one."""

import pytest
import torch

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


def test_online_priors_settings_are_checked(single_rank, sara_data):
    with pytest.raises(ConfigError, match="leave data.prior_store unset"):
        _config(sara_data, **{"sara.priors": "online"})
    with pytest.raises(ConfigError, match="sara.priors must be one of"):
        _config(sara_data, **{"sara.priors": "live"})
