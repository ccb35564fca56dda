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


@pytest.mark.parametrize("override, section, key, expected", [
    ("optim.train_steps=1e3", "optim", "train_steps", 1000),  # YAML leaves "1e3" a string
    ("data.global_batch_size=2.56e2", "data", "global_batch_size", 256),
    ("optim.train_steps=12.0", "optim", "train_steps", 12),
    ("optim.lr=1.0e-5", "optim", "lr", 1e-5),
    ("optim.warmup_fraction=0", "optim", "warmup_fraction", 0.0),
    ("model.bf16=false", "model", "bf16", False),
    ("model.bf16=null", "model", "bf16", None),
    ("checkpoint.resume=no", "checkpoint", "resume", False),
    ("data.shards_dir=2024", "data", "shards_dir", "2024"),  # a path YAML reads as a number
    ("data.languages=hi", "data", "languages", ["hi"]),  # not ['h', 'i']
    ("data.languages=hi, ne", "data", "languages", ["hi", "ne"]),
    ("data.languages=[sw]", "data", "languages", ["sw"]),
    ("data.languages=all", "data", "languages", "all"),
])
def test_overrides_are_coerced_to_their_field_types(override, section, key, expected):
    value = getattr(getattr(load_train_config(None, [override]), section), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("optim.train_steps=2.5", "optim.train_steps must be an integer, got 2.5"),
    ("optim.train_steps=0", "optim.train_steps must be >= 1, got 0"),
    ("data.micro_batch_size=abc", "data.micro_batch_size must be an integer, got 'abc'"),
    ("data.global_batch_size=0", "data.global_batch_size must be >= 1, got 0"),
    ("logging.log_interval=0", "logging.log_interval must be >= 1, got 0"),
    ("optim.warmup_fraction=1.5", r"optim.warmup_fraction must be in \[0, 1\], got 1.5"),
    ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
    ("optim.lr=.nan", "optim.lr must be >= 0, got nan"),
    ("sara.lambda_js=-1", "sara.lambda_js must be >= 0, got -1.0"),
    ("parallel.ep=0", "parallel.ep must be >= 1, got 0"),
    ("seed=", "seed needs a value"),
    ("model.bf16=maybe", "model.bf16 must be true or false, got 'maybe'"),
    ("optim.distributed_optimizer=2", "optim.distributed_optimizer must be true or false"),
    ("data.languages=[]", "data.languages must be targets, all or language codes"),
    ("data.languages=[hi, 3]", "data.languages must be targets, all or language codes"),
    ("sara.layers=rnage", "sara.layers must be one of range, all, random, got 'rnage'"),
    ("sara.impl=trtion", "sara.impl must be one of auto, triton, reference, got 'trtion'"),
])
def test_bad_values_are_refused_naming_key_and_value(override, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(None, [override])


def test_alignment_range_must_run_forwards():
    with pytest.raises(ValueError, match=r"sara.first_layer \(20\) is after sara.last_layer \(10\)"):
        load_train_config(None, ["sara.first_layer=20", "sara.last_layer=10"])
    cfg = load_train_config(None, ["sara.first_layer=10", "sara.last_layer=10"])
    assert (cfg.sara.first_layer, cfg.sara.last_layer) == (10, 10)


def test_yaml_values_are_checked_like_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  train_steps: 1.0e3\n  lr: 1e-4\ndata:\n  languages: hi\n")
    cfg = load_train_config(str(path))
    assert cfg.optim.train_steps == 1000 and cfg.optim.lr == 1e-4 and cfg.data.languages == ["hi"]
    path.write_text("logging:\n  log_interval: 0\n")
    with pytest.raises(ValueError, match="logging.log_interval must be >= 1"):
        load_train_config(str(path))


def _checkpoint_folder(path, content):
    path.mkdir()
    (path / "weights").write_text(content)


@pytest.mark.parametrize("kill_at", range(6))
def test_resaving_the_latest_iteration_survives_a_kill_at_any_point(tmp_path, monkeypatch, kill_at):
    """A finished run re-launched saves its last iteration again, over the only checkpoint: a
    kill at any filesystem step of the commit leaves `latest...txt` naming a complete copy, old or
    new."""
    from sara_megatron.training import checkpoint

    _checkpoint_folder(tmp_path / "iter_0000002", "old")
    (tmp_path / LATEST_FILE).write_text("2")
    _checkpoint_folder(tmp_path / "iter_0000002.tmp", "new")  # a staged save, every rank done
    calls = []

    def killed_after(real, name):
        def step(*args, **kwargs):
            if len(calls) == kill_at:
                raise KeyboardInterrupt(f"killed at {name}")
            calls.append(name)
            return real(*args, **kwargs)
        return step

    monkeypatch.setattr(checkpoint.os, "rename", killed_after(checkpoint.os.rename, "rename"))
    monkeypatch.setattr(checkpoint.os, "replace", killed_after(checkpoint.os.replace, "replace"))
    monkeypatch.setattr(checkpoint.shutil, "rmtree",
                        killed_after(checkpoint.shutil.rmtree, "rmtree"))
    final = str(tmp_path / "iter_0000002")
    try:
        checkpoint._commit(str(tmp_path), final + ".tmp", final, 2)
        finished = True
    except KeyboardInterrupt:
        finished = False
    monkeypatch.undo()

    assert finished == (kill_at >= 4), calls  # rename aside, rename in, pointer, rmtree aside
    assert latest_iteration(str(tmp_path)) == 2
    content = (tmp_path / "iter_0000002" / "weights").read_text()
    assert content == ("new" if kill_at >= 2 else "old")
    if finished:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", LATEST_FILE]


def test_a_leftover_aside_copy_is_cleared_by_the_next_resave(tmp_path):
    from sara_megatron.training import checkpoint

    _checkpoint_folder(tmp_path / "iter_0000004", "new")
    _checkpoint_folder(tmp_path / "iter_0000004.old", "old")  # killed while deleting it
    (tmp_path / LATEST_FILE).write_text("4")
    assert latest_iteration(str(tmp_path)) == 4  # the complete copy in place is the one used
    _checkpoint_folder(tmp_path / "iter_0000004.tmp", "newer")
    final = str(tmp_path / "iter_0000004")
    checkpoint._commit(str(tmp_path), final + ".tmp", final, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", LATEST_FILE]
    assert (tmp_path / "iter_0000004" / "weights").read_text() == "newer"


def test_override_scheduler_is_off_unless_asked():
    """A resumed run whose schedule differs from the checkpoint's is refused unless the config
    says that its own schedule wins."""
    assert load_train_config(None).optim.override_scheduler is False
    assert load_train_config(None, ["optim.override_scheduler=true"]).optim.override_scheduler is True
