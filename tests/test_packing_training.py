"""Packed SARA training (data.packing): a packed step trains on the padded step's samples with the
same CE, JS and gradients; a stopped packed run resumes on its trajectory; at DP=2, TP=2 with
sequence parallel, CP=2, PP=2 and EP=2 (one launch) the steps take the single rank's samples, TP=2,
CP=2 and PP=2 reproduce its losses, and SARA still lowers JS at EP=2 and PP=2. (The kill -9 of a
packed run is in test_training.)"""

import json

import pytest
import torch

import launch

BASE = {
    "model.preset": "qwen3_moe_tiny",
    # the fixture's samples have 30-60 tokens: two to four share a row of 128
    "data.seq_length": 128,
    "data.micro_batch_size": 1,
    "data.global_batch_size": 8,
    "data.packing": "true",
    "sara.layers": "all",
    "optim.lr": "1e-3",
}


def _base(sara_data, **extra):
    values = {**BASE, "model.checkpoint": sara_data["checkpoint"],
              "data.shards_dir": sara_data["shards"], "data.prior_store": sara_data["priors"]}
    values.update(extra)
    return {k: str(v) for k, v in values.items()}


class StepRecorder:
    """Wraps a trainer's batch iterator: per step (packed micro-batches name their step's count;
    unpacked ones come `per_step` at a time), the sorted "language:id" of its samples and the
    rows."""

    def __init__(self, batches, per_step: int):
        self.batches, self.per_step = batches, per_step
        self.steps, self._left = [], 0

    def __iter__(self):
        return self

    def __next__(self):
        mb = next(self.batches)
        if not self._left:
            self._left = mb.step_micro_batches or self.per_step
            self.steps.append(([], 0))
        ids, rows = self.steps[-1]
        named = [f"{lang}:{sid}" for lang, sid in zip(mb.languages, mb.sample_ids)]
        self.steps[-1] = (sorted(ids + named), rows + mb.tokens.shape[0])
        self._left -= 1
        return mb


def _trainer(sara_data, **extra):
    from sara_megatron.training import Trainer, load_train_config

    trainer = Trainer(load_train_config(None, [f"{k}={v}" for k, v in
                                               _base(sara_data, **extra).items()]))
    recorder = StepRecorder(trainer.state.batches, trainer.plan.num_microbatches)
    trainer.state.batches = recorder
    return trainer, recorder.steps


def test_a_packed_step_is_the_padded_step(single_rank, sara_data):
    """Same samples, fewer rows; CE, JS and every gradient as padded. (LB is a statistic of each
    micro-batch's tokens, which packing regroups: off here, as in test_training's split test.)"""
    runs = {}
    for packing in ("false", "true"):
        trainer, seen = _trainer(sara_data, **{"data.packing": packing, "optim.train_steps": 1,
                                               "model.moe_aux_loss_coeff": 0.0})
        record = trainer.train_step()
        grads = {n: p.main_grad.detach().clone()
                 for n, p in trainer.chunks[0].module.named_parameters()}
        runs[packing] = (record, grads, seen[0])
    (padded, padded_grads, (padded_ids, padded_rows)) = runs["false"]
    (packed, packed_grads, (packed_ids, packed_rows)) = runs["true"]
    assert packed_ids == padded_ids and len(packed_ids) == 8
    assert packed_rows < padded_rows
    assert packed.ce == pytest.approx(padded.ce, rel=1e-6)
    assert packed.js == pytest.approx(padded.js, rel=1e-5) and packed.js > 0
    assert packed.grad_norm == pytest.approx(padded.grad_norm, rel=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_packed_layouts_follow_the_single_rank_run(single_rank, sara_data, tmp_path):
    # Every run is on the LR schedule of the longest (12 steps); most compare their first 3.
    steps, schedule = 3, {"optim.train_steps": 12}
    trainer, seen = _trainer(sara_data, **schedule)
    single = [trainer.train_step() for _ in range(steps)]
    cases = [
        {"name": "dp2", "overrides": {}, "steps": steps},
        {"name": "tp2", "overrides": {"parallel.tp": 2}, "steps": steps},
        {"name": "cp2", "overrides": {"parallel.cp": 2}, "steps": steps},
        {"name": "ep2", "overrides": {"parallel.ep": 2, "sara.lambda_js": 1.5}, "steps": 12},
        # 12 steps: the first 3 are the one-rank run's, over all 12 SARA lowers JS
        {"name": "pp2", "overrides": {"parallel.pp": 2}, "steps": 12},
    ]
    run = launch.CaseLaunch("tests/workers/packing_layouts.py", "--cases", json.dumps(cases),
                            "--base", json.dumps(_base(sara_data, **schedule)), out_dir=tmp_path,
                            nproc=2)
    dp2, tp2, cp2, ep2, pp2 = (run.result(c["name"])["steps"] for c in cases)
    single_ids = [ids for ids, _ in seen]
    # The same samples at every step, whatever the data-parallel size (DP=2; DP=1 under TP=2).
    for layout in (dp2, tp2, cp2, pp2):
        assert [s["samples"] for s in layout[:steps]] == single_ids
    # TP=2 + SP and CP=2 split each micro-batch's tokens, PP=2 its layers, not the micro-batches:
    # the one-rank run.
    for layout in (tp2, cp2, pp2):
        for one, split in zip(single, layout):
            for key, rel in (("ce", 1e-5), ("lb", 1e-5), ("grad_norm", 1e-5), ("js", 1e-4)):
                assert split[key] == pytest.approx(getattr(one, key), rel=rel), key
    # DP=2 splits the step's micro-batches over ranks; the first step starts from the same weights.
    assert dp2[0]["ce"] == pytest.approx(single[0].ce, rel=1e-5)
    assert dp2[0]["js"] == pytest.approx(single[0].js, rel=1e-4)
    # SARA with packing at EP=2 and at PP=2 lowers JS.
    for layout in (ep2, pp2):
        assert len(layout) == 12
        js = [s["js"] for s in layout]
        assert sum(js[-3:]) < 0.8 * sum(js[:3]), js


def test_a_packed_run_resumes_on_its_trajectory(single_rank, sara_data, tmp_path):
    """Stopped after a step and resumed from its checkpoint, a packed run trains the second step
    on the same samples with the same losses as the run that went on."""
    steps = {"optim.train_steps": 2}
    full, full_seen = _trainer(sara_data, **steps)
    uninterrupted = full.run().steps
    saving = {**steps, "checkpoint.save_dir": tmp_path / "ckpt"}
    first, _ = _trainer(sara_data, **saving)
    first.run(max_steps=1)
    resumed, resumed_seen = _trainer(sara_data, **saving)
    assert resumed.iteration == 1 and resumed.consumed_samples == 8
    (record,) = resumed.run().steps
    assert resumed_seen == full_seen[1:]
    for key in ("ce", "lb", "js", "grad_norm"):
        assert getattr(record, key) == pytest.approx(getattr(uninterrupted[1], key), rel=1e-6), key


def test_packing_may_be_switched_at_a_resume(single_rank, sara_data, tmp_path):
    """Both modes take the same samples per step, so a packed run resumed unpacked trains its
    second step on the samples, with the CE and JS, of the packed run that went on. (LB off: it
    is a statistic of each micro-batch's tokens, which packing regroups.)"""
    steps = {"optim.train_steps": 2, "model.moe_aux_loss_coeff": 0.0}
    full, full_seen = _trainer(sara_data, **steps)
    uninterrupted = full.run().steps
    saving = {**steps, "checkpoint.save_dir": tmp_path / "ckpt"}
    first, _ = _trainer(sara_data, **saving)
    first.run(max_steps=1)
    resumed, resumed_seen = _trainer(sara_data, **saving, **{"data.packing": "false"})
    assert resumed.iteration == 1 and resumed.consumed_samples == 8
    (record,) = resumed.run().steps
    assert [ids for ids, _ in resumed_seen] == [full_seen[1][0]]
    assert resumed_seen[0][1] > full_seen[1][1]  # one row per sample now
    assert record.ce == pytest.approx(uninterrupted[1].ce, rel=1e-6)
    assert record.js == pytest.approx(uninterrupted[1].js, rel=1e-5) and record.js > 0
