"""Checkpoints across megatron-core versions: a training checkpoint saved under one version
resumes under the other and follows the uninterrupted run, and an HF import gives the same
tensors under both.

The other version is another Python environment: `make test-latest` (lane 2: the newest
megatron-core) runs these with lane 1's interpreter (megatron-core 0.16.1) as
SARA_OTHER_STACK_PYTHON. Without it (lane 1 itself) there is no second version to compare with.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import launch
from conftest import REPO

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.stack]

RUNS_WORKER = "tests/workers/training_runs.py"
STEPS, SAVED_AT = 4, 2
RUN = ["model.preset=qwen3_moe_tiny", "data.mock=true", "data.seq_length=32",
       "data.micro_batch_size=2", "data.global_batch_size=4", "sara.layers=all",
       "optim.lr=1e-3", f"optim.train_steps={STEPS}", "logging.log_interval=1"]


def _megatron_version(python: str) -> str:
    proc = launch.run([python, "-c", "import megatron.core as m; print(m.__version__)"], REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().split("+")[0]


@pytest.fixture(scope="module")
def other_python() -> str:
    python = os.environ.get("SARA_OTHER_STACK_PYTHON")
    if not python:
        pytest.skip("SARA_OTHER_STACK_PYTHON is not set: `make test-latest` sets it to lane 1's "
                    "interpreter (the other megatron-core version)")
    assert Path(python).is_file(), f"SARA_OTHER_STACK_PYTHON={python} does not exist"
    ours, theirs = _megatron_version(sys.executable), _megatron_version(python)
    assert ours != theirs, f"both interpreters run megatron-core {ours}: nothing to compare"
    return python


def _runs(python: str, out: Path, cases: list[dict]) -> dict[str, list[dict]]:
    """The training runs `cases` in one process of `python` (one rank); each run's logged steps."""
    proc = launch.run([python, RUNS_WORKER, "--cases", json.dumps(cases), "--out-dir", out], REPO,
                      timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {c["name"]: json.loads((out / f"{c['name']}.json").read_text())["records"]
            for c in cases}


def _case(name: str, save_dir: Path | None = None, max_steps: int | None = None) -> dict:
    saving = ([f"checkpoint.save_dir={save_dir}", f"checkpoint.save_interval={SAVED_AT}"]
              if save_dir else [])
    return {"name": name, "overrides": RUN + saving, "max_steps": max_steps}


def _same_steps(resumed: list[dict], reference: list[dict], rel: float) -> None:
    assert [r["step"] for r in resumed] == list(range(SAVED_AT + 1, STEPS + 1))
    for got, want in zip(resumed, reference[SAVED_AT:]):
        for key in ("ce", "lb", "js", "grad_norm", "lr"):
            assert got[key] == pytest.approx(want[key], rel=rel), (got["step"], key)


def _reads_newest_format(python: str) -> bool:
    proc = launch.run([python, "-c", "from sara_megatron.compat.megatron_versions import "
                       "reads_common_state_inside_checkpoint as r; print(r())"], REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip() == "True"


def test_training_checkpoints_resume_across_versions(other_python, tmp_path):
    """Saved at step 2 under one version, resumed under the other: steps 3 and 4 are those of
    the resuming version's uninterrupted run; a version that cannot read the other's format
    (0.16.1-0.18 read no 0.19 checkpoint) refuses it in one line, as tools/train.py. And the two
    versions train alike."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    from_theirs = _runs(other_python, theirs, [
        _case("saved", theirs / "ckpt", max_steps=SAVED_AT), _case("reference")])
    from_ours = _runs(sys.executable, ours, [
        _case("resumed", theirs / "ckpt"), _case("saved", ours / "ckpt", max_steps=SAVED_AT),
        _case("reference")])
    _same_steps(from_ours["resumed"], from_ours["reference"], rel=1e-6)

    # Back the other way, through the tool a user runs.
    log = theirs / "back.jsonl"
    settings = _case("back", ours / "ckpt")["overrides"] + [f"logging.json_log={log}"]
    proc = launch.run(launch.tool_command("train", [a for s in settings for a in ("--set", s)],
                                          python=other_python), REPO, timeout=600)
    if _reads_newest_format(other_python) or not _reads_newest_format(sys.executable):
        assert proc.returncode == 0, proc.stderr[-3000:]
        _same_steps([json.loads(line) for line in log.read_text().splitlines()],
                    from_theirs["reference"], rel=1e-6)
    else:
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("train.py: error: checkpoint ") and (
            "saved by megatron-core 0.19 or later" in last), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    # The same step under either version: same data, same weights, same arithmetic.
    for a, b in zip(from_ours["reference"], from_theirs["reference"]):
        for key in ("ce", "lb", "js", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_hf_import_gives_the_same_tensors_under_both_versions(other_python, tmp_path):
    """tools/convert_hf.py import of one HF model under either version: both checkpoints load
    under this version into the same tensors, bit for bit."""
    from test_convert_hf import _model_weights, _qwen3_moe

    hf = tmp_path / "hf"
    _qwen3_moe(hf)
    for python, out in ((other_python, tmp_path / "theirs"), (sys.executable, tmp_path / "ours")):
        proc = launch.run(launch.tool_command("convert_hf", ["import", "--hf-dir", hf, "--out", out],
                                              python=python), REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = _model_weights(hf, tmp_path / "theirs")
    ours = _model_weights(hf, tmp_path / "ours")
    assert sorted(theirs) == sorted(ours) and ours
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name
