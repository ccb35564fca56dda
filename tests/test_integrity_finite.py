"""Finite or stop: a non-finite config number is refused at load time; a run whose loss, gradient
norm or JS goes non-finite (JS negative: its inputs were) stops before the next save, naming the
step and the terms, with the last good checkpoint untouched; the tools print these as one line."""

import subprocess
import sys

import pytest

import launch


from sara_megatron.checkpointing.manifest import verify_checkpoint
from sara_megatron.training.config import ConfigError, load_train_config


@pytest.fixture(autouse=True)
def own_stamp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SARA_VERIFY_CACHE", str(tmp_path / "stamps"))


@pytest.mark.parametrize("setting", ["optim.lr=inf", "optim.adam_eps=.inf",
                                     "model.moe_aux_loss_coeff=1e400", "sara.lambda_js=inf"])
def test_a_non_finite_number_is_refused_naming_its_key(setting):
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number, got inf$"):
        load_train_config(None, [setting])


def _train_py(*args, cwd):
    env = launch.environment()
    return subprocess.run(launch.tool("train", *args), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.multiprocess
def test_train_py_prints_config_errors_as_one_line(tmp_path):
    proc = _train_py("--set", "optim.lr=inf", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "train.py: error: optim.lr must be a finite number, got inf"
    assert "Traceback" not in proc.stderr



def test_train_py_without_a_config_says_one_is_required(monkeypatch, capsys):
    import importlib

    tool = importlib.import_module("sara_megatron.cli.train")
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_:
        tool.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "train.py: error: a config is required: --config FILE")


def test_a_run_that_goes_non_finite_stops_before_it_saves(single_rank, tmp_path, caplog):
    """lr 1e30 (finite, so accepted): step 1 is fine and saved, its update blows the weights up,
    and step 2 logs CE NaN and a negative JS (the reference JS masks NaN probabilities). The run
    stops there: no iter_2, iter_1 intact; a run without checkpoint.save_dir warns at start."""
    import logging

    from sara_megatron.training.trainer import NonFiniteError
    from test_training import _mock_trainer

    run = tmp_path / "run"
    trainer = _mock_trainer(**{"optim.train_steps": 4, "data.seq_length": 32,
                               "optim.lr": 1e30, "optim.warmup_fraction": 0,
                               "checkpoint.save_dir": run, "checkpoint.save_interval": 1})
    with pytest.raises(NonFiniteError, match=r"^step 2: non-finite ce=nan, lb=nan, js=-[0-9.]+, "
                                             r"grad_norm=nan \(a JS divergence is never "
                                             r"negative: its inputs were not finite\); training "
                                             rf"stopped before saving, the last checkpoint, "
                                             rf"{run}/iter_0000001, is untouched"):
        trainer.run()
    assert sorted(p.name for p in run.iterdir()) == ["iter_0000001",
                                                     "latest_checkpointed_iteration.txt"]
    assert verify_checkpoint(run / "iter_0000001")

    with caplog.at_level(logging.WARNING, logger="sara_megatron.training.trainer"):
        _mock_trainer(**{"data.seq_length": 32})
    assert "checkpoint.save_dir is not set: nothing of this run will be saved" in caplog.text
