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


def test_resume_replaces_the_steps_it_replays(tmp_path, capsys):
    # An earlier process logged steps 1 and 2 and died mid-line in step 3; the checkpoint is at
    # step 1, so steps 2 and 3 are run again and must appear once, with the new values.
    log, tb_dir = tmp_path / "log.jsonl", tmp_path / "tb"
    writer = MetricsWriter(10, tensorboard_dir=str(tb_dir), json_log=str(log), start_step=0)
    for step, scalars, per_layer in STEPS:
        writer.write(step, scalars, per_layer)
    writer.close()
    with open(log, "a") as handle:
        handle.write('{"step": 3, "ce": 2.')
    writer = MetricsWriter(10, tensorboard_dir=str(tb_dir), json_log=str(log), start_step=1)
    assert "dropped 2 lines logged after step 1" in capsys.readouterr().out
    writer.write(2, dict(ce=9.0), {})
    writer.write(3, dict(ce=8.0, grad_norm=float("nan")), {})
    writer.close()

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["step"], r["ce"]) for r in records] == [(1, 2.5), (2, 9.0), (3, 8.0)]
    assert records[2]["grad_norm"] is None  # strict JSON: no bare NaN
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("ce")] == [(1, 2.5), (2, 9.0), (3, 8.0)]


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


class _Clock:
    """Stands in for time.time() in the metrics module."""

    def __init__(self, now=1000.0):
        self.now = now

    def time(self):
        return self.now


def _eta(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1].rsplit("| ", 1)[-1]


def test_eta_counts_only_the_steps_this_process_ran(monkeypatch, capsys):
    """Resumed at step 900 of 1000 with 2 s steps: 99 steps left take 198 s, not the 0.2 s that
    the global step (901 steps in 2 s) would give."""
    clock = _Clock()
    monkeypatch.setattr("sara_megatron.training.metrics.time", clock)
    writer = MetricsWriter(1000, start_step=900)
    clock.now += 2.0
    writer.write(901, dict(ce=1.0), {})
    assert _eta(capsys) == "eta 198s"
    clock.now += 18.0
    writer.write(910, dict(ce=1.0), {})
    assert _eta(capsys) == "eta 180s"  # 10 steps in 20 s, 90 left


def test_eta_without_a_start_step_measures_from_the_first_write(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr("sara_megatron.training.metrics.time", clock)
    writer = MetricsWriter(1000)
    clock.now += 300.0  # model build, resume: not training steps
    writer.write(905, dict(ce=1.0, step_time_s=2.5), {})
    assert _eta(capsys) == "eta 238s"  # its own step time stands in: 95 × 2.5 s
    clock.now += 10.0
    writer.write(910, dict(ce=1.0, step_time_s=1.0), {})
    assert _eta(capsys) == "eta 180s"  # 5 steps in 10 s since the first write, 90 left
    fresh = MetricsWriter(10)
    fresh.write(1, dict(ce=1.0), {})  # no step time and nothing measured yet
    assert _eta(capsys) == "eta ?"


@pytest.mark.parametrize("make_path, message", [
    (lambda tmp: tmp / "missing" / "log.jsonl",
     "logging.json_log .*its folder .*missing does not exist"),
    (lambda tmp: tmp, "logging.json_log .* is a folder"),
])
def test_a_bad_json_log_is_refused_before_anything_is_opened(tmp_path, make_path, message):
    from sara_megatron.training.metrics import check_metrics_setup

    path = str(make_path(tmp_path))
    with pytest.raises(RuntimeError, match=message):
        check_metrics_setup(json_log=path)
    with pytest.raises(RuntimeError, match=message):
        MetricsWriter(10, json_log=path)
    check_metrics_setup(json_log=str(tmp_path / "log.jsonl"))  # a new file in an existing folder


def test_setup_check_names_missing_packages_and_keys(monkeypatch):
    from sara_megatron.training.metrics import check_metrics_setup

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(RuntimeError, match="tensorboard package is not installed"):
        check_metrics_setup(tensorboard_dir="tb")
    monkeypatch.setitem(sys.modules, "wandb", _RecordingWandb())
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(RuntimeError, match="WANDB_API_KEY"):
        check_metrics_setup(wandb_project="sara")


def test_a_key_saved_by_wandb_login_is_enough(monkeypatch, tmp_path):
    from sara_megatron.training.metrics import check_metrics_setup

    monkeypatch.setitem(sys.modules, "wandb", _RecordingWandb())
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.org login user password other\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    with pytest.raises(RuntimeError, match="wandb login"):
        check_metrics_setup(wandb_project="sara")  # a netrc without wandb's host
    netrc_file.write_text("machine api.wandb.ai login user password not-a-real-key\n")
    check_metrics_setup(wandb_project="sara")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a self-hosted server
    with pytest.raises(RuntimeError, match="wandb login"):
        check_metrics_setup(wandb_project="sara")


# --- tools/train.py: a rank that fails ends the job; rank 0 shows the library's INFO lines ------
# A failing rank must print its error and exit at once, not wait in the shutdown barrier for a rank
# that waits for it (which hung the job).

_RANK0_WRITER_BREAKS = """
import runpy, sys
import sara_megatron.training.trainer as trainer
import torch.distributed as dist

class BrokenOnRank0(trainer.MetricsWriter):
    def __init__(self, *args, **kwargs):
        raise OSError("metrics writer broke on rank %d" % dist.get_rank())

trainer.MetricsWriter = BrokenOnRank0  # the trainer builds it on rank 0 only, in run()
sys.argv = sys.argv[1:]  # the tool's module, then its arguments
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""

_MOCK_RUN = [arg for value in ("model.num_layers=2", "data.mock=true", "data.seq_length=32",
                                "data.micro_batch_size=2", "data.global_batch_size=4",
                                "optim.train_steps=3", "sara.layers=all")
             for arg in ("--set", value)]


def _torchrun_output(tmp_path, script, *args, nproc=2, timeout=90):
    import launch

    # A hang shows as subprocess.TimeoutExpired.
    proc = launch.run(launch.torchrun_command(
        script, *[str(a).replace("{repo}", str(launch.REPO)) for a in args], nproc=nproc),
        tmp_path, timeout, start_new_session=True)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.multiprocess
def test_a_bad_json_log_fails_a_two_rank_run_at_once(tmp_path):
    code, output = _torchrun_output(tmp_path, "train", *_MOCK_RUN,
                                    "--set", f"logging.json_log={tmp_path}/missing/log.jsonl")
    assert code != 0
    assert "logging.json_log" in output and "does not exist" in output, output[-3000:]
    assert "rank 0 failed" in output


@pytest.mark.multiprocess
def test_an_error_on_one_rank_mid_run_ends_the_job(tmp_path):
    (tmp_path / "breaks.py").write_text(_RANK0_WRITER_BREAKS)
    code, output = _torchrun_output(tmp_path, tmp_path / "breaks.py", "sara_megatron.cli.train",
                                    *_MOCK_RUN)
    assert code != 0
    assert "metrics writer broke on rank 0" in output, output[-3000:]
    assert "rank 0 failed" in output


@pytest.mark.multiprocess
def test_relaunching_a_finished_run_logs_its_resume_and_resave(tmp_path):
    """Rank 0 shows the library's INFO lines (they were filtered out at WARNING). A finished run
    launched again resumes at its last step, trains nothing and saves that iteration again, in
    place of the old copy."""
    save = ["--set", f"checkpoint.save_dir={tmp_path}/ckpt", "--set", "logging.log_interval=100"]
    for launch in ("first", "again"):
        code, output = _torchrun_output(tmp_path, "train", *_MOCK_RUN, *save,
                                        nproc=1)
        assert code == 0, output[-3000:]
        assert "saved " in output and "iter_0000003" in output, (launch, output[-3000:])
    assert "resumed from" in output
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "iter_0000003", "latest_checkpointed_iteration.txt"]
