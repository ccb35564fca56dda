"""The tools live in `sara_megatron.cli`: `tools/<tool>.py` only calls its main, setup.py installs
a `sara-<tool>` console script for each, and `sara_megatron.tool_runner` is the one launcher of
tool runs (the demo's, the experiment's and the tests')."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

import launch
import pytest
import yaml
from launch import REPO

from sara_megatron.cli import TOOLS, console_script
from sara_megatron.tool_runner import tool_command


def _checkout_tools() -> list[str]:
    return sorted(p.stem for p in (REPO / "tools").glob("*.py"))


def _setup_py_tools() -> list[str]:
    """The TOOLS list setup.py makes its console scripts of, read without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["TOOLS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no TOOLS list")


def test_every_checkout_tool_has_a_module_and_a_console_script():
    assert _checkout_tools() == sorted(TOOLS) == sorted(_setup_py_tools())
    assert sorted(p.stem for p in (REPO / "sara_megatron" / "cli").glob("*.py")
                  if p.stem != "__init__") == sorted(TOOLS)
    assert console_script("shard_corpus") == "sara-shard-corpus"
    assert console_script("train") == "sara-train"


@pytest.mark.parametrize("tool", TOOLS)
def test_checkout_tool_only_calls_the_package_main(tool):
    """tools/<tool>.py runs `sara_megatron.cli.<tool>.main` and holds no logic of its own."""
    path = REPO / "tools" / f"{tool}.py"
    spec = importlib.util.spec_from_file_location(f"checkout_{tool}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is importlib.import_module(f"sara_megatron.cli.{tool}").main
    functions = [n for n in ast.parse(path.read_text()).body
                 if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert functions == []


def test_tool_command_runs_the_module_with_this_interpreter():
    assert tool_command("train", ["--config", 3]) == [
        sys.executable, "-m", "sara_megatron.cli.train", "--config", "3"]
    cmd = tool_command("extract_priors", ["--ep", "2"], nproc=2, launcher="sara_megatron.torchrun")
    assert cmd == [sys.executable, "-m", "sara_megatron.torchrun", "--standalone",
                   "--nproc-per-node", "2", "-m", "sara_megatron.cli.extract_priors", "--ep", "2"]
    assert tool_command("train", python="/other/python")[0] == "/other/python"
    with pytest.raises(ValueError, match="a tool's name"):
        tool_command("tools/train.py")


def test_the_demo_trains_from_the_example_config():
    """The demo writes its training config from `DEMO_TRAIN_CONFIG` (an installed copy has no
    examples/ folder); examples/tiny_cpu_sara.yaml, which a user starts from, holds the same."""
    from sara_megatron.demo import DEMO_TRAIN_CONFIG

    example = yaml.safe_load((REPO / "examples" / "tiny_cpu_sara.yaml").read_text())
    assert example == DEMO_TRAIN_CONFIG


def test_latest_checkpoint(tmp_path):
    from sara_megatron.training.checkpoint import CannotResumeError, latest_checkpoint

    with pytest.raises(CannotResumeError, match="holds no complete checkpoint"):
        latest_checkpoint(tmp_path)
    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "iter_0000004")


@pytest.mark.multiprocess
def test_checkout_script_and_module_print_the_same_help(tmp_path):
    """`python tools/plan_layout.py` and `python -m sara_megatron.cli.plan_layout` are one tool:
    the same help, the same program name in it."""
    by_path = launch.run_checked([sys.executable, REPO / "tools" / "plan_layout.py", "--help"],
                                 tmp_path, timeout=120)
    by_module = launch.run_checked(launch.tool("plan_layout", "--help"), tmp_path, timeout=120)
    assert by_path.stdout == by_module.stdout
    assert by_module.stdout.startswith("usage: plan_layout.py")
