"""A non-editable install runs: the project installed into a fresh virtual environment (not
`pip install -e`), run from a folder outside the checkout, has its console scripts and runs the
demo's first stages (corpus, translation, shards, conversion, priors on 2 ranks under torchrun)
with nothing of the checkout on its path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import launch
import pytest
from launch import REPO

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _copy_sources(to: Path) -> Path:
    """The checkout's files git knows (tracked, or new and not ignored), without build outputs or
    virtual environments: pip builds in the copy, so the checkout gets no build/ or egg-info."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others",
                            "--exclude-standard", "-z"], capture_output=True, check=True)
    for name in filter(None, names.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, to / name)
    return to


def _fresh_venv(folder: Path) -> Path:
    """A new virtual environment whose path ends with this one's site-packages (torch,
    megatron-core, ... without a reinstall). The line added is a plain path: the `.pth` files
    there, the editable install's finder among them, are not run, so this environment sees no
    `sara_megatron` until one is installed into it."""
    # No pip of its own: this environment's pip and setuptools (found through the path line) build
    # and install, rather than the older ones ensurepip would put first on the path.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True,
                   capture_output=True)
    python = folder / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "test_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_non_editable_install_runs_the_demos_first_stages(tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    source = _copy_sources(tmp_path / "source")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = launch.environment()
    env.pop("PYTHONPATH", None)

    def run(*cmd, timeout=600):
        proc = subprocess.run(list(map(str, cmd)), cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc.stdout

    probe = "import sara_megatron; print(sara_megatron.__file__)"
    assert subprocess.run([python, "-c", probe], cwd=elsewhere, env=env,
                          capture_output=True).returncode != 0  # nothing installed yet
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
        "--no-index", source)
    shutil.rmtree(source)  # the installed copy must need nothing of its source

    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .strip())
    package = Path(run(python, "-c", probe).strip())
    assert package == site / "sara_megatron" / "__init__.py", package
    assert not package.is_relative_to(REPO)
    dist = next(site.glob("sara_megatron-*.dist-info"))
    direct_url = json.loads((dist / "direct_url.json").read_text())
    assert not direct_url.get("dir_info", {}).get("editable", False)
    # Its own package data and kernels came along.
    assert (site / "sara_megatron" / "kernels").is_dir()
    assert list((site / "sara_megatron" / "evaluation" / "lm_eval_tasks").glob("*.yaml"))

    # The console scripts, installed beside the interpreter (called by path: PATH is not needed).
    bin_dir = python.parent
    usage = run(bin_dir / "sara-shard-corpus", "--help")
    assert usage.startswith("usage: sara-shard-corpus")
    assert "--anchor-language" in usage
    assert os.access(bin_dir / "sara-train", os.X_OK)

    # The demo's stages 1 to 4 through the installed launcher: every tool as
    # `python -m sara_megatron.cli.<tool>` of the installed copy, extract_priors on 2 ranks.
    work = elsewhere / "demo"
    run(python, "-c", "import sys; from pathlib import Path; "
        "from sara_megatron.demo import prepare_demo_inputs; "
        "prepare_demo_inputs(Path(sys.argv[1]), 16)", work, timeout=900)
    for step in ("translate", "shard", "convert", "extract_priors"):
        assert (work / "logs" / f"{step}.log").is_file()
    assert sorted(p.name for p in (work / "shards").iterdir() if p.is_dir()) == ["en", "hi", "sw"]
    assert (work / "base").is_dir() and any((work / "priors").iterdir())
    log = (work / "logs" / "extract_priors.log").read_text()
    assert str(REPO) not in log  # no traceback or path from the checkout
