"""Checkpoints are checked where they are read: every save writes a manifest of its files'
sha256 inside the folder the atomic rename publishes; loading model weights, resuming and
exporting check it. Damage is made on copies: flipped bytes, a cut `.distcp`, a garbage
`latest_checkpointed_iteration.txt`, a save that fails on a full disk."""

import errno
import json
import logging
import os
import shutil

import pytest

from sara_megatron.checkpointing.manifest import (
    MANIFEST_FILE,
    CheckpointDamagedError,
    verify_checkpoint,
)


@pytest.fixture(autouse=True)
def own_stamp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SARA_VERIFY_CACHE", str(tmp_path / "stamps"))


def _flip(path, offset=4096, count=3):
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[offset + i] ^= 0x10
    path.write_bytes(bytes(data))


def _largest_distcp(folder):
    return max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_model_weights_refuse_a_damaged_checkpoint_naming_the_file(single_rank, sara_data,
                                                                   tmp_path):
    from sara_megatron.checkpointing import load_model_weights
    from sara_megatron.models.architecture import get_preset
    from sara_megatron.models.builder import build_model

    model = build_model(get_preset("qwen3_moe_tiny"))
    ckpt = shutil.copytree(sara_data["checkpoint"], tmp_path / "ckpt")
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert set(manifest) >= {"metadata.json", "common.pt"} and any(
        name.endswith(".distcp") for name in manifest)
    load_model_weights(model, ckpt)  # intact; the first load hashes every file

    # A later load of the unchanged files reads none of them: the stamp vouches for them.
    from sara_megatron import file_stamps

    hashed, real = [], file_stamps.sha256_file
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(file_stamps, "sha256_file", lambda path: hashed.append(path) or real(path))
        assert verify_checkpoint(ckpt) and hashed == []

    target = _largest_distcp(ckpt)
    pristine = target.read_bytes()
    _flip(target)
    with pytest.raises(CheckpointDamagedError, match=rf"checkpoint {ckpt} is damaged: "
                                                     rf"{target}: its sha256 differs"):
        load_model_weights(model, ckpt)
    os.truncate(target, target.stat().st_size - 100)
    with pytest.raises(CheckpointDamagedError, match=rf"{target} has \d+ bytes, the manifest "
                                                     rf"\d+ \(cut short\)"):
        load_model_weights(model, ckpt)
    target.write_bytes(pristine)
    (ckpt / "metadata.json").unlink()
    with pytest.raises(CheckpointDamagedError, match=rf"damaged: {ckpt}/metadata\.json is "
                                                     r"missing$"):
        load_model_weights(model, ckpt)


def _trainer(save_dir, **overrides):
    from test_training import _mock_trainer

    return _mock_trainer(**{"optim.train_steps": 4, "data.seq_length": 32,
                            "checkpoint.save_dir": save_dir,
                            "checkpoint.save_interval": 1, **overrides})


def test_resume_skips_a_damaged_latest_checkpoint_or_refuses_under_strict(single_rank, tmp_path,
                                                                          caplog):
    run = tmp_path / "run"
    assert _trainer(run).run(max_steps=2).final_iteration == 2
    latest = run / "iter_0000002"
    assert (latest / MANIFEST_FILE).exists() and not (run / "iter_0000002.tmp").exists()
    intact = shutil.copytree(latest, tmp_path / "intact")
    _flip(_largest_distcp(latest))

    with caplog.at_level(logging.WARNING, logger="sara_megatron.training.checkpoint"):
        resumed = _trainer(run)
    assert resumed.iteration == 1
    assert f"checkpoint {latest} is damaged: {_largest_distcp(latest)}: its sha256 differs" in \
        caplog.text
    assert f"resuming from the newest intact checkpoint, {run / 'iter_0000001'}" in caplog.text
    with pytest.raises(CheckpointDamagedError, match=rf"{latest} is damaged.*"
                                                     r"checkpoint\.strict_resume"):
        _trainer(run, **{"checkpoint.strict_resume": True})

    # A pointer that is not a number: the newest iteration folder is used.
    shutil.rmtree(latest)
    shutil.copytree(intact, latest)
    (run / "latest_checkpointed_iteration.txt").write_text("garbage\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sara_megatron.training.checkpoint"):
        assert _trainer(run).iteration == 2
    assert "latest_checkpointed_iteration.txt cannot be read" in caplog.text


def test_a_save_that_fails_removes_its_partial_folder_and_says_disk_full(single_rank, tmp_path,
                                                                         monkeypatch):
    from megatron.core import dist_checkpointing

    from sara_megatron.tool_errors import DiskFullError

    run = tmp_path / "run"
    trainer = _trainer(run)
    trainer.run(max_steps=1)

    def fill_then_fail(state, folder, *args, **kwargs):
        with open(os.path.join(folder, "__0_0.distcp"), "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dist_checkpointing, "save", fill_then_fail)
    trainer.iteration += 1
    with pytest.raises(DiskFullError, match=r"no space left on the device holding .*"
                                            r"iter_0000002\.tmp \(errno 28, ENOSPC\)"):
        trainer.save()
    assert sorted(p.name for p in run.iterdir()) == ["iter_0000001",
                                                     "latest_checkpointed_iteration.txt"]


def test_export_refuses_a_damaged_checkpoint_and_non_finite_weights(tmp_path, capsys):
    """convert_hf.py export: one line naming the damaged file; a checkpoint whose weights hold
    NaN or inf (a diverged run) is refused naming the first such tensor, leaving no output."""
    import math

    import torch
    import importlib

    from test_convert_hf import _qwen3_moe

    from sara_megatron.checkpointing import load_model_weights, save_model_weights
    from sara_megatron.conversion.hf_import import import_hf_checkpoint
    from sara_megatron.models.architecture import from_hf_config
    from sara_megatron.models.builder import build_model

    hf = tmp_path / "hf"
    _qwen3_moe(hf)
    imported = tmp_path / "imported"
    import_hf_checkpoint(hf, imported)  # also initialises this process's one-rank group
    assert "sara_conversion.json" in json.loads((imported / MANIFEST_FILE).read_text())["files"]
    # The weights of a run that diverged: one NaN in a router.
    model = build_model(from_hf_config(json.loads((hf / "config.json").read_text())))
    load_model_weights(model, imported)
    with torch.no_grad():
        model.decoder.layers[1].mlp.router.weight.view(-1)[3] = math.nan
    ckpt = tmp_path / "ckpt"
    save_model_weights(model, ckpt)

    convert = importlib.import_module("sara_megatron.cli.convert_hf")
    export = ["export", "--megatron-dir", str(ckpt), "--out", str(tmp_path / "out"),
              "--hf-dir", str(hf)]
    capsys.readouterr()
    assert convert.main(export) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"convert_hf.py export: error: checkpoint {ckpt}: tensor model.layers.1.mlp.gate.weight "
        "(checkpoint key decoder.layers.mlp.router.weight) holds 1 non-finite value(s) (NaN or "
        "inf) of 256; the weights diverged: export an earlier checkpoint")
    assert not (tmp_path / "out").exists()

    # (a weights-only save has no common.pt from megatron-core 0.19 on: damage a shard)
    _flip(ckpt / "__0_0.distcp", offset=64, count=1)
    assert convert.main(export) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"convert_hf.py export: error: checkpoint {ckpt} is damaged: {ckpt}/__0_0.distcp: its "
        "sha256 differs from the manifest's (altered since it was saved)")
