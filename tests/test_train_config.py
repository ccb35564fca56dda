"""Run configs: YAML + overrides, errors on unknown keys, the shipped examples load and fit."""

from pathlib import Path

import pytest

from sara_megatron.models.architecture import resolve_architecture
from sara_megatron.training.checkpoint import LATEST_FILE, latest_iteration
from sara_megatron.training.config import load_train_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 2.0e-5\nsara:\n  lambda_js: 1.5\n")
    cfg = load_train_config(str(path), ["optim.lr=1e-4", "data.languages=[hi, ne]",
                                        "parallel.ep=4", "data.prior_store=null"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.sara.lambda_js == 1.5
    assert cfg.data.languages == ["hi", "ne"]
    assert cfg.parallel.ep == 4 and cfg.data.prior_store is None


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*optim.learning_rate"):
        load_train_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_train_config(None, ["optim.lr"])


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_load_and_their_layouts_fit(name):
    cfg = load_train_config(str(EXAMPLES / name))
    arch = resolve_architecture(cfg.model.preset)
    p = cfg.parallel
    arch.validate_parallel(tp=p.tp, ep=p.ep, pp=p.pp)
    if "fft" in name:
        assert cfg.sara.lambda_js == 0.0
    elif "tiny" not in name:
        assert (cfg.sara.lambda_js, cfg.optim.lr, cfg.data.global_batch_size) == (1.5, 2e-5, 256)


def test_latest_checkpoint_ignores_an_unfinished_save(tmp_path):
    assert latest_iteration(str(tmp_path)) is None
    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / LATEST_FILE).write_text("2")
    (tmp_path / "iter_0000004.tmp").mkdir()  # a save killed before its rename
    assert latest_iteration(str(tmp_path)) == 2
    (tmp_path / LATEST_FILE).write_text("4")
    with pytest.raises(RuntimeError, match="folder is missing"):
        latest_iteration(str(tmp_path))
