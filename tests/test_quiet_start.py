"""A quiet start: the known megatron-core / torch start-up warnings are silenced by message, one
log line names the fallbacks in use, and any other warning still shows."""

import os
import subprocess
import sys

import launch
import pytest

from conftest import REPO

pytestmark = pytest.mark.multiprocess

KNOWN = ("Transformer Engine and Apex are not installed", "`load_state_dict` is deprecated")


def _python(code: str) -> subprocess.CompletedProcess:
    # No PYTHONWARNINGS from the caller: the process sees Python's default warning filters.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_tool_help_prints_none_of_the_known_warnings():
    proc = subprocess.run(launch.tool("routing_report", "--help"),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: routing_report.py" in proc.stdout
    for message in KNOWN:
        assert message not in proc.stdout + proc.stderr


def test_known_warnings_are_silenced_and_others_still_show(tmp_path):
    proc = _python(f"""
import warnings
import sara_megatron
import megatron.core.optimizer  # warns about TE and Apex at import
from torch.distributed.checkpoint import FileSystemReader, load_state_dict
try:
    load_state_dict({{}}, FileSystemReader({str(tmp_path)!r}))  # warns, then fails: no metadata
except Exception:
    pass
warnings.warn("an unrelated user warning", UserWarning)
warnings.warn("Transformer Engine is fine but this is another message", UserWarning)
warnings.warn("some other API is deprecated", FutureWarning)
""")
    assert proc.returncode == 0, proc.stderr
    for message in KNOWN:
        assert message not in proc.stderr
    assert "UserWarning: an unrelated user warning" in proc.stderr
    assert "UserWarning: Transformer Engine is fine but this is another message" in proc.stderr
    assert "FutureWarning: some other API is deprecated" in proc.stderr


def test_the_known_warnings_do_show_without_the_package():
    """The counter-case: the filters above are what silences them, not the environment."""
    proc = _python("import megatron.core.optimizer")
    assert KNOWN[0] in proc.stderr


def test_one_log_line_names_the_fallbacks():
    proc = _python("""
import logging
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from sara_megatron.distributed import ParallelConfig, destroy_distributed, initialize_distributed
initialize_distributed(ParallelConfig(), seed=1)
initialize_distributed(ParallelConfig(), seed=1)
destroy_distributed()
""")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "fallbacks in use" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sara_megatron.distributed fallbacks in use: ")
    for fallback in ("no Transformer Engine", "no Apex", "CPU compatibility layer"):
        assert fallback in lines[0]
    assert "Transformer Engine and Apex are not installed" not in proc.stderr
