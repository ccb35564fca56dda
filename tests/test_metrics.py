"""The per-step metrics writer: progress line, TensorBoard scalars (read back with TensorBoard's own
event reader), JSON lines, and the wandb wiring."""

import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sara_megatron.training.metrics import MetricsWriter

STEPS = [
    (1, dict(ce=2.5, lb=0.125, js=0.04, lr=1e-5, grad_norm=1.5, tokens_per_s=1000.0), {7: 0.05, 8: 0.03}),
    (2, dict(ce=2.25, lb=0.12, js=0.03, lr=2e-5, grad_norm=1.25, tokens_per_s=1100.0), {7: 0.04, 8: 0.02}),
]


def _write_all(writer):
    for step, scalars, per_layer in STEPS:
        writer.write(step, scalars, per_layer)
    writer.close()


def test_progress_tensorboard_and_json_lines(tmp_path, capsys):
    tb_dir, log = tmp_path / "tb", tmp_path / "log.jsonl"
    _write_all(MetricsWriter(10, tensorboard_dir=str(tb_dir), json_log=str(log)))

    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("step 1/10 | ce 2.5 | lb 0.125 | js 0.04 | lr 1e-05 | grad_norm 1.5")
    assert "tokens_per_s 1000" in lines[0] and "eta" in lines[0]
    assert "| js_layers 7:0.05,8:0.03 |" in lines[0]
    assert lines[1].startswith("step 2/10 | ce 2.25")

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"ce", "lb", "js", "lr", "grad_norm", "tokens_per_s", "js_layer/7", "js_layer/8"}
    for step, scalars, per_layer in STEPS:
        expected = dict(scalars, **{f"js_layer/{layer}": value for layer, value in per_layer.items()})
        for tag, value in expected.items():
            (event,) = [e for e in events.Scalars(tag) if e.step == step]
            assert event.value == pytest.approx(value, rel=1e-6), tag

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["js_layer/8"] == 0.02 and records[0]["ce"] == 2.5


def test_json_log_appends_across_restarts(tmp_path):
    log = tmp_path / "log.jsonl"
    writer = MetricsWriter(10, json_log=str(log))
    writer.write(*STEPS[0])
    writer.close()
    writer = MetricsWriter(10, json_log=str(log))  # a resumed run keeps the earlier lines
    writer.write(*STEPS[1])
    writer.close()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


class _RecordingWandb(types.ModuleType):
    """Stands in for the wandb package: records what the writer hands it."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, project, config):
        self.calls.append(("init", project, config))
        return self

    def log(self, values, step):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_gets_every_scalar_and_the_run_config(monkeypatch):
    fake = _RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    _write_all(MetricsWriter(10, wandb_project="sara", run_config={"seed": 3}))
    assert fake.calls[0] == ("init", "sara", {"seed": 3})
    logged = [call for call in fake.calls if call[0] == "log"]
    assert [call[2] for call in logged] == [1, 2]
    assert logged[0][1]["js_layer/7"] == 0.05 and logged[1][1]["grad_norm"] == 1.25
    assert fake.calls[-1] == ("finish",)


def test_wandb_refuses_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(RuntimeError, match="wandb is not installed"):
        MetricsWriter(10, wandb_project="sara")
    monkeypatch.setitem(sys.modules, "wandb", _RecordingWandb())
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(RuntimeError, match="WANDB_API_KEY"):
        MetricsWriter(10, wandb_project="sara")
