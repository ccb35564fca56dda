"""docs/reproduce.md cannot drift from the tools: its `runbook` blocks are parsed, the variables
take the demo's tiny values, every command's flags go through the tool's own argument parser
(stopped right after parsing), every `--set` of a training command through the run config, and
the cheap stages (the planner, the translation dry run) run end to end."""

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from launch import REPO

RUNBOOK = REPO / "docs" / "reproduce.md"
BLOCK = re.compile(r"^```bash runbook\n(.*?)^```", re.S | re.M)
VARIABLE = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)\}?")
TOOL = re.compile(r"^tools/(\w+)\.py$")


def runbook_commands(text: str) -> list[str]:
    """Each command of the `runbook` blocks, continuation lines joined."""
    commands = []
    for block in BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def documented_variables(text: str) -> set[str]:
    """The variables of the page's table, and those a runbook block assigns."""
    table = set(re.findall(r"^\| `\$([A-Z_]+)` \|", text, re.M))
    assigned = {m for c in runbook_commands(text) for m in re.findall(r"^([A-Z_]+)=\$\(", c)}
    return table | assigned


def tiny_values(root: Path) -> dict[str, str]:
    return {"HF": str(root / "hf"), "WORK": str(root / "work"), "CKPT": str(root / "ckpt"),
            "RUNS": str(root / "runs"), "EXPORTS": str(root / "exports"),
            "RESULTS": str(root / "results"), "REPORT": str(root / "report"),
            "SERVER": "http://127.0.0.1:9/v1",
            "SARA_CKPT": str(root / "runs" / "sara" / "iter_0000003"),
            "FFT_CKPT": str(root / "runs" / "fft" / "iter_0000003")}


def substitute(token: str, values: dict[str, str]) -> str:
    def value(match):
        if match.group(1) not in values:
            raise AssertionError(f"runbook variable ${match.group(1)} has no tiny value")
        return values[match.group(1)]

    return VARIABLE.sub(value, token)


class Parsed(Exception):
    """Raised by the patched parser once the tool's flags are parsed."""

    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def tool_module(name: str):
    module = importlib.import_module(f"sara_megatron.cli.{name}")
    return module


def parse_with_tool(name: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """The tool's own parser on `argv`, stopped right after parsing (before any check of files
    or any work); fails the test with argparse's message on a flag the tool does not take."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        ns = original(self, args, namespace)
        if self.prog.split()[0].endswith((f"{name}.py", name)) and " " not in self.prog:
            raise Parsed(ns)
        return ns

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [f"tools/{name}.py", *argv])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            tool_module(name).main()
    except Parsed as done:
        return done.namespace
    except SystemExit as exit_:
        pytest.fail(f"tools/{name}.py refused the runbook's flags {argv}: {err.getvalue()}"
                    f"(exit {exit_.code})")
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    pytest.fail(f"tools/{name}.py did not parse its arguments")


def split_command(command: str, values: dict[str, str]):
    """(env, tool name, argv, sbatch script or None) of a runbook command; None for a line that
    only assigns a variable (its tiny value stands in)."""
    if re.match(r"^[A-Z_]+=\$\(", command):
        return None  # NAME=$(...): the variable's tiny value stands in
    tokens = shlex.split(command)
    env = {}
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = substitute(value, values)
    if not tokens:
        return None
    tokens = [substitute(t, values) for t in tokens]
    program, *rest = tokens
    script = None
    if program == "python":
        target, *argv = rest
    elif program == "torchrun":
        assert rest[0] == "--nproc-per-node" and rest[1].isdigit(), command
        target, *argv = rest[2:]
    elif program == "sbatch":
        script, *argv = rest
        assert (REPO / script).is_file(), f"no sbatch script {script}"
        target = "tools/train.py"  # the recipe passes its arguments to train.py
    else:
        raise AssertionError(f"runbook command of an unknown program: {command}")
    match = TOOL.match(target)
    assert match and (REPO / target).is_file(), f"no tool {target} ({command})"
    return env, match.group(1), argv, script


def sbatch_config(script: str, env: dict) -> str:
    """The run config an sbatch recipe trains: $CONFIG, else the script's default."""
    if "CONFIG" in env:
        return env["CONFIG"]
    default = re.search(r"CONFIG=\$\{CONFIG:-([^}]+)\}", (REPO / script).read_text())
    return default.group(1)


def test_runbook_uses_documented_variables_and_covers_every_stage():
    text = RUNBOOK.read_text()
    commands = runbook_commands(text)
    used = {v for c in commands for v in VARIABLE.findall(c)}
    assert used <= documented_variables(text), used - documented_variables(text)
    tools = {split_command(c, tiny_values(Path("/x")))[1] for c in commands
             if split_command(c, tiny_values(Path("/x")))}
    assert tools >= {"plan_layout", "answer_anchors", "filter_correct", "translate_corpus",
                     "shard_corpus", "convert_hf", "extract_priors", "train", "evaluate",
                     "significance", "report"}
    assert "--dry-run" in text and "vllm serve" in text and "sbatch examples/" in text


def test_runbook_commands_parse_with_the_tools(tmp_path, monkeypatch):
    """Every runbook command's flags through its tool's parser; every training command's
    config and --set overrides through the run config; the evaluation runs 3 times."""
    from sara_megatron.training import load_train_config

    values = tiny_values(tmp_path)
    checked = []
    for command in runbook_commands(RUNBOOK.read_text()):
        split = split_command(command, values)
        if split is None:
            continue
        env, name, argv, script = split
        ns = parse_with_tool(name, argv, monkeypatch)
        if name == "train":
            config = ns.config or sbatch_config(script, env)
            cfg = load_train_config(str(REPO / config), ns.overrides)
            assert (cfg.data.seq_length, cfg.data.micro_batch_size) == (2048, 1)
            assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep) == (1, 2, 8)
        if name == "evaluate":
            assert ns.runs == 3
        checked.append(name)
    assert checked.count("train") == 2 and checked.count("evaluate") == 3


@pytest.mark.slow  # ~10 s: the planner builds and checks the tiny model twice
def test_cheap_stages_run_end_to_end(tmp_path, monkeypatch, capsys):
    """The planner (on a tiny Qwen3-MoE config in $HF) and the translation dry run (on the demo's
    anchors in $WORK) run as the runbook writes them."""
    from sara_megatron.demo import write_demo_anchors
    from sara_megatron.models.architecture import get_preset
    from sara_megatron.planning.conversion_check import hf_config

    values = tiny_values(tmp_path)
    hf_config(get_preset("qwen3_moe_tiny")).save_pretrained(values["HF"])
    write_demo_anchors(Path(values["WORK"]) / "anchors_en.jsonl", 8)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    ran = []
    for command in runbook_commands(RUNBOOK.read_text()):
        split = split_command(command, values)
        if split is None:
            continue
        _, name, argv, _ = split
        if name == "plan_layout" or (name == "translate_corpus" and "--dry-run" in argv):
            assert tool_module(name).main(argv) in (0, None), command
            ran.append(name)
    out = capsys.readouterr().out
    assert ran == ["plan_layout", "plan_layout", "translate_corpus"]
    assert "TP=1 PP=2 EP=8 DP=8" in out and "map one to one" in out
    assert '"dry_run": true' in out and not os.path.exists(Path(values["WORK"]) / "corpus" / "hi.jsonl")
