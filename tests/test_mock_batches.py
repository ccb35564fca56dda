"""Mock SARA micro-batches: well-formed, reproducible per index, resumable; a mock SARA run steps."""

import math

import pytest
import torch

from sara_megatron.data.mock_batches import MockSaraLoader


def _loader(**kw):
    args = dict(vocab_size=500, num_experts=16, prior_layers=(1, 2), seq_length=32,
                micro_batch_size=3, dp_rank=0, dp_size=2, seed=7)
    args.update(kw)
    return MockSaraLoader(**args)


def test_batches_are_full_length_rows_with_prompt_quarter_and_priors():
    batch = next(iter(_loader()))
    assert batch.tokens.shape == (3, 32) and not batch.padding_mask.any()
    assert int(batch.tokens.max()) < 500
    assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])
    # The loss starts where the next token is the first response token (position 8 = 32 / 4).
    assert batch.loss_mask[:, :7].sum() == 0 and batch.loss_mask[:, 7:31].all()
    assert batch.loss_mask[:, 31].sum() == 0
    assert batch.priors.shape == (2, 3, 16) and batch.priors.dtype == torch.float32
    torch.testing.assert_close(batch.priors.sum(-1), torch.ones(2, 3))
    assert batch.prior_layers == (1, 2) and batch.with_priors(None) is batch


def test_ranks_differ_and_a_resumed_loader_continues_the_sequence():
    it = iter(_loader())
    first = [next(it) for _ in range(3)]
    other_rank = next(iter(_loader(dp_rank=1)))
    assert not torch.equal(first[0].tokens, other_rank.tokens)
    # 2 batches of 3 rows on 2 ranks consumed = 12 samples.
    resumed = next(iter(_loader(consumed_samples=12)))
    assert torch.equal(resumed.tokens, first[2].tokens)
    assert torch.equal(resumed.priors, first[2].priors)
    with pytest.raises(ValueError, match="multiple of micro batch"):
        _loader(consumed_samples=5)


def test_mock_sara_run_steps_and_reports_throughput(single_rank):
    from sara_megatron.training import Trainer, load_train_config

    cfg = load_train_config(None, [
        "model.preset=qwen3_moe_tiny", "model.num_layers=2", "data.mock=true",
        "data.seq_length=32", "data.micro_batch_size=2", "data.global_batch_size=4",
        "sara.layers=all", "optim.lr=1e-3", "optim.train_steps=3",
    ])
    trainer = Trainer(cfg)
    assert trainer.arch.num_layers == 2 and trainer.alignment_layers == [0, 1]
    records = [trainer.train_step() for _ in range(3)]
    for r in records:
        assert math.isfinite(r.ce) and r.js > 0 and sorted(r.js_per_layer) == [0, 1]
        assert r.tflops_per_gpu > 0 and r.tokens_per_s > 0
    with pytest.raises(ValueError, match="model.num_layers"):
        Trainer(load_train_config(None, ["model.num_layers=9", "data.mock=true"]))


def test_bench_tool_default_ep_fits_the_world():
    """benchmarks/bench_sara_step.py keeps the tiny config's EP 2 where it fits and drops to what
    does (its one-GPU example: EP 2 does not fit a world of 1)."""
    import importlib.util
    from pathlib import Path

    from sara_megatron.distributed import ParallelConfig

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sara_step.py"
    spec = importlib.util.spec_from_file_location("bench_sara_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.fitting_ep(ParallelConfig(ep=2), world_size=1) == 1
    assert bench.fitting_ep(ParallelConfig(ep=2), world_size=2) == 2
    assert bench.fitting_ep(ParallelConfig(ep=2), world_size=8) == 2
    assert bench.fitting_ep(ParallelConfig(ep=4), world_size=6) == 2
    assert bench.fitting_ep(ParallelConfig(ep=2, tp=2), world_size=2) == 1  # dp 1


def _sample_loader(packed: bool, **kw):
    from sara_megatron.data.mock_batches import MockSampleLoader

    args = dict(vocab_size=300, num_experts=8, prior_layers=(0, 1),
                lengths=[(10, 40), (20, 90), (5, 30)], seq_length=128, micro_batch_size=2,
                global_batch_size=8, packed=packed, seed=3)
    args.update(kw)
    return MockSampleLoader(**args)


@pytest.mark.parametrize("packed", [False, True])
def test_sample_loader_steps_hold_the_same_samples_packed_or_padded(packed):
    """A step's micro-batches name their count, carry one prior per sample, and hold exactly
    the step's samples' tokens; packed and padded steps draw the same samples."""
    loader = _sample_loader(packed)
    seqs, _, priors = loader.step_samples(0)
    step = loader.step(0)
    assert {mb.step_micro_batches for mb in step} == {len(step)}
    assert sum(int((~mb.padding_mask).sum()) for mb in step) == sum(len(x) for x in seqs)
    assert sum(len(mb.sample_ids) for mb in step) == 8
    for mb in step:
        assert mb.priors.shape == (2, len(mb.sample_ids), 8)
        assert (mb.segment_ids is not None) == packed
        if packed:  # segment ids index the micro-batch's samples
            assert int(mb.segment_ids.max()) == len(mb.sample_ids) - 1
    assert torch.equal(torch.cat([mb.priors for mb in _sample_loader(False).step(0)], 1), priors)
    # Same step, same samples; another step, others.
    assert torch.equal(_sample_loader(packed).step(0)[0].tokens, step[0].tokens)
    assert not torch.equal(loader.step(1)[0].tokens, step[0].tokens)
    assert 0 < loader.fill_rate(0) <= 1


def test_sample_loader_packs_into_fewer_rows():
    padded, packed = _sample_loader(False), _sample_loader(True)
    rows = sum(mb.tokens.shape[0] for mb in packed.step(0))
    assert rows < 8 and packed.fill_rate(0) > padded.fill_rate(0)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        _sample_loader(False, global_batch_size=7)
