"""No orphans, no full disks: kill -9 of the launcher (torchrun) leaves no process of the run
alive 10 s later (workers and the checkpoint writer's helpers die with their parent); outputs are
checked writable before any compute; a full disk is reported as such (errno 28 in plain words)
and a failed save leaves no partial folder behind."""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import launch


from sara_megatron.tool_errors import DiskFullError, OutputNotWritableError, check_writable_output

# sysfs: no file can be created there, not even by root (whom a chmod does not stop).
READ_ONLY = "/sys/kernel"


@pytest.fixture(autouse=True)
def own_stamp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SARA_VERIFY_CACHE", str(tmp_path / "stamps"))


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (every process of the run inherits it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    with open(f"/proc/{pid}/stat") as s:
                        if s.read().split(") ")[-1].split()[0] != "Z":  # zombies are dead
                            found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.multiprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_kill_9_of_the_launcher_leaves_no_process_of_the_run(tmp_path):
    marker = f"SARA_TEST_RUN={uuid.uuid4().hex}"
    env = launch.environment(SARA_TEST_RUN=marker.split("=")[1])
    settings = {"model.preset": "qwen3_moe_tiny", "data.mock": "true", "data.seq_length": 32,
                "data.micro_batch_size": 1, "data.global_batch_size": 2, "sara.layers": "all",
                "optim.train_steps": 100000, "logging.json_log": tmp_path / "log.jsonl",
                # A save every step: the writer's helper processes are about most of the time.
                "checkpoint.save_dir": tmp_path / "run", "checkpoint.save_interval": 1}
    launcher = subprocess.Popen(
        launch.tool("train", *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")],
                    nproc=2),
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            log = tmp_path / "log.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= 2:
                break
            assert launcher.poll() is None, "the run ended before it was killed"
            time.sleep(0.5)
        else:
            pytest.fail("the run logged no step in 240 s")
        assert len(_processes_with(marker)) >= 3  # torchrun and its two workers
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        # Every process of the run is gone within 10 s (none is left to start another).
        deadline = time.monotonic() + 10
        while (survivors := _processes_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert survivors == [], [open(f"/proc/{p}/cmdline").read() for p in survivors]
    finally:
        for pid in _processes_with(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_outputs_are_checked_writable_before_any_compute(sara_data, tmp_path, capsys,
                                                        monkeypatch):
    """Each tool refuses a read-only output at once, in one line naming the flag or setting."""
    import importlib

    from sara_megatron.training.config import load_train_config
    from sara_megatron.training.output_checks import check_before_start

    def tool(name):
        module = importlib.import_module(f"sara_megatron.cli.{name}")
        return module

    with pytest.raises(OutputNotWritableError, match=rf"checkpoint\.save_dir {READ_ONLY}/run: "
                                                     rf"cannot write in {READ_ONLY}"):
        check_before_start(load_train_config(None, [f"checkpoint.save_dir={READ_ONLY}/run"]), 0, 1)
    with pytest.raises(OutputNotWritableError, match=r"logging\.json_log"):
        check_before_start(load_train_config(None, [f"logging.json_log={READ_ONLY}/a.jsonl"]), 0, 1)

    shards, ckpt = str(sara_data["shards"]), str(sara_data["checkpoint"])
    with pytest.raises(SystemExit) as exit_:
        tool("extract_priors").parse_args(["--shards", shards, "--checkpoint", ckpt,
                                           "--output", f"{READ_ONLY}/priors"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(  # prog: pytest's argv[0]
        f": error: --output {READ_ONLY}/priors: cannot write in {READ_ONLY} (Permission denied)")
    with pytest.raises(SystemExit):
        tool("shard_corpus").parse_args(["--corpus", str(sara_data["root"] / "corpus"),
                                         "--tokenizer", "x", "--output", f"{READ_ONLY}/shards"])
    assert f"error: --output {READ_ONLY}/shards: cannot write" in capsys.readouterr().err
    assert tool("convert_hf").main(["import", "--hf-dir", str(tmp_path), "--out",
                                    f"{READ_ONLY}/ckpt"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"convert_hf.py import: error: --out {READ_ONLY}/ckpt: cannot write in {READ_ONLY} "
        "(Permission denied)")

    # routing_divergence.py printed its table and then failed on --json: now it fails first.
    monkeypatch.setattr(sys, "argv", ["routing_divergence.py", "--shards", shards, "--checkpoint",
                                      ckpt, "--model", "qwen3_moe_tiny", "--json",
                                      f"{READ_ONLY}/d.json"])
    with pytest.raises(SystemExit) as exit_:
        tool("routing_divergence").parse_args()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"routing_divergence.py: error: --json {READ_ONLY}/d.json: cannot write in {READ_ONLY} "
        "(Permission denied)")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KiB tmpfs, where the platform lets this process mount one."""
    folder = tmp_path / "tiny_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.multiprocess
def test_a_full_disk_is_named_and_a_failed_save_leaves_nothing(single_rank, tiny_disk, tmp_path,
                                                               capsys):
    """A training save and a conversion onto a disk too small for them: the save fails with
    "no space left" and its iter_N.tmp is removed (the space comes back); import says the same
    in one line, not "enforce fail at inline_container.cc"; a full disk is refused up front."""
    from test_convert_hf import _qwen3_moe
    from test_training import _mock_trainer

    run = tiny_disk / "run"
    trainer = _mock_trainer(**{"data.seq_length": 32, "checkpoint.save_dir": run})
    free_before = os.statvfs(tiny_disk).f_bavail
    with pytest.raises(DiskFullError, match=rf"no space left on the device holding {run}/"
                                            r"iter_0000001\.tmp \(errno 28, ENOSPC\)"):
        trainer.run(max_steps=1)  # one step, then the save at the end
    assert os.listdir(run) == [] and os.statvfs(tiny_disk).f_bavail >= free_before - 2

    import importlib

    convert = importlib.import_module("sara_megatron.cli.convert_hf")
    _qwen3_moe(tmp_path / "hf")
    assert convert.main(["import", "--hf-dir", str(tmp_path / "hf"), "--out",
                         str(tiny_disk / "ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("convert_hf.py import: error: no space left on the device holding ")
    assert "(errno 28, ENOSPC)" in err and "enforce fail" not in err
    assert sorted(os.listdir(tiny_disk)) == ["run"]

    with open(tiny_disk / "filler", "wb") as f:  # the disk now full
        try:
            f.write(b"\0" * (1 << 20))
        except OSError:
            pass
    with pytest.raises(DiskFullError, match=r"--out: no space left on the device holding"):
        check_writable_output(tiny_disk / "out", "--out")
