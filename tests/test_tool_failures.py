"""Command-line tools that fail: one failing rank ends a torchrun job at once (with its traceback)
instead of hanging it in `destroy_distributed()`'s barrier, and bad flags are refused at parse
time (exit 2, naming the flag), before any model is built or a process group started."""

import json
import subprocess
import sys

import psutil
import pytest

import launch

from conftest import REPO

from sara_megatron.checkpointing import save_model_weights
from sara_megatron.data.corpus_sharding import ShardingConfig, shard_corpus
from sara_megatron.data.local_tokenizer import build_local_tokenizer
from sara_megatron.data.synthetic_corpus import corpus_texts, write_synthetic_corpus
from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model

pytestmark = pytest.mark.multiprocess

# Rank 1 fails right after loading the weights, while rank 0 goes on into the next collective
# (the model fingerprint's broadcast): the situation of an OOM on one GPU.
_RANK1_FAILS_AFTER_LOAD = """
import runpy, sys
import sara_megatron.checkpointing as checkpointing
import torch.distributed as dist

original = checkpointing.load_model_weights

def load_then_fail_on_rank1(*args, **kwargs):
    original(*args, **kwargs)
    if dist.get_rank() == 1:
        raise RuntimeError("injected failure on rank 1 after loading the weights")

checkpointing.load_model_weights = load_then_fail_on_rank1  # the tool imports it when run
sys.argv = sys.argv[1:]  # the tool's module, then its arguments
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run(cmd, cwd, timeout):
    """(exit status, stdout + stderr); on a timeout kill the command and everything it started
    (torchrun starts its workers in sessions of their own) and fail."""
    env = launch.environment()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        for p in family:
            p.kill()
        proc.kill()
        output, _ = proc.communicate()
        psutil.wait_procs(family, timeout=30)
        pytest.fail(f"{' '.join(map(str, cmd))} still running after {timeout}s (hung?):\n"
                    f"{output[-4000:]}")
    return proc.returncode, output


@pytest.fixture(scope="module")
def tool_inputs(single_rank, tmp_path_factory):
    """Token shards and a random tiny Qwen3-MoE checkpoint, made the way users make them."""
    import torch

    root = tmp_path_factory.mktemp("tool_failures")
    paths = write_synthetic_corpus(root / "corpus", 8, languages=("en", "hi"))
    build_local_tokenizer(corpus_texts(paths), root / "tokenizer")
    shard_corpus(ShardingConfig((str(root / "corpus"),), str(root / "shards"),
                                str(root / "tokenizer"), seq_length=64, shard_size=4))
    torch.manual_seed(0)
    save_model_weights(build_model(get_preset("qwen3_moe_tiny")), root / "ckpt")
    return root


def test_one_failing_rank_ends_extract_priors_at_once(tool_inputs, tmp_path):
    (tmp_path / "fails.py").write_text(_RANK1_FAILS_AFTER_LOAD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           tmp_path / "fails.py", "sara_megatron.cli.extract_priors",
           "--shards", tool_inputs / "shards", "--checkpoint", tool_inputs / "ckpt",
           "--model", "qwen3_moe_tiny", "--output", tmp_path / "priors", "--ep", "2"]
    code, output = _run(cmd, tmp_path, timeout=120)
    assert code != 0, output[-4000:]
    assert "injected failure on rank 1 after loading the weights" in output, output[-4000:]
    assert "rank 1 failed" in output, output[-4000:]


# A process that imports the tools' libraries once and runs each case's command line in it (as
# `python tool.py ...` would), with the process group's start-up made to raise: a case that gets
# that far shows as a failure, not as a job to wait for. Prints {case: [exit status, stderr]}.
_RUN_CASES = """
import contextlib, io, json, runpy, sys
import torch.distributed as dist

def no_start_up(*args, **kwargs):
    raise RuntimeError("distributed start-up reached")

dist.init_process_group = no_start_up
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    sys.argv = argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:
        code, err = -1, io.StringIO(err.getvalue() + repr(e))
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""

# Real inputs: a case not refused at parse time would go on to build and load the model.
_EXTRACT = ["--shards", "{shards}", "--checkpoint", "{ckpt}", "--model", "qwen3_moe_tiny",
            "--output", "{out}"]
_DIVERGENCE = ["--shards", "{shards}", "--checkpoint", "{ckpt}", "--model", "qwen3_moe_tiny"]
_BENCH = ["--mock"]

# (tool, command line, the flag the message must name)
BAD_FLAGS = {
    "extract-mbs-0": ("extract_priors", _EXTRACT + ["--micro-batch-size", "0"],
                      "--micro-batch-size"),
    "extract-num-microbatches-0": ("extract_priors", _EXTRACT + ["--num-microbatches", "0"],
                                   "--num-microbatches"),
    "extract-flush-every-0": ("extract_priors", _EXTRACT + ["--flush-every", "0"],
                              "--flush-every"),
    "extract-tp-0": ("extract_priors", _EXTRACT + ["--tp", "0"], "--tp"),
    "extract-ep-negative": ("extract_priors", _EXTRACT + ["--ep", "-2"], "--ep"),
    "extract-pp-0": ("extract_priors", _EXTRACT + ["--pp", "0"], "--pp"),
    "extract-missing-checkpoint": (
        "extract_priors", ["--shards", "{shards}", "--checkpoint", "{dir}/missing", "--model",
                           "qwen3_moe_tiny", "--output", "{out}"], "--checkpoint"),
    "extract-missing-shards": (
        "extract_priors", ["--shards", "{dir}/missing", "--checkpoint", "{ckpt}", "--model",
                           "qwen3_moe_tiny", "--output", "{out}"], "--shards"),
    "divergence-batch-size-0": ("routing_divergence", _DIVERGENCE + ["--batch-size", "0"],
                                "--batch-size"),
    "divergence-missing-checkpoint": (
        "routing_divergence", ["--shards", "{shards}", "--checkpoint", "{dir}/missing", "--model",
                               "qwen3_moe_tiny"], "--checkpoint"),
    "divergence-missing-shards": (
        "routing_divergence", ["--shards", "{dir}/missing", "--checkpoint", "{ckpt}", "--model",
                               "qwen3_moe_tiny"], "--shards"),
    "divergence-layers-outside": ("routing_divergence", _DIVERGENCE + ["--layers", "9"],
                                  "--model / --layers"),
    "divergence-json-folder-missing": (
        "routing_divergence", _DIVERGENCE + ["--json", "{dir}/missing/d.json"], "--json"),
    "bench-steps-0": ("bench_sara_step", _BENCH + ["--steps", "0"], "--steps"),
    "bench-warmup-negative": ("bench_sara_step", _BENCH + ["--warmup", "-1"], "--warmup"),
    "bench-micro-batch-0": ("bench_sara_step", _BENCH + ["--micro-batch", "0"], "--micro-batch"),
    "bench-global-batch-0": ("bench_sara_step", _BENCH + ["--global-batch", "0"],
                             "--global-batch"),
    "bench-seq-length-0": ("bench_sara_step", _BENCH + ["--seq-length", "0"], "--seq-length"),
    "bench-num-layers-0": ("bench_sara_step", _BENCH + ["--num-layers", "0"], "--num-layers"),
    "bench-ep-0": ("bench_sara_step", _BENCH + ["--ep", "0"], "--ep"),
    "bench-missing-work": ("bench_sara_step", ["--work", "{dir}/missing"], "--work"),
    "bench-json-folder-missing": ("bench_sara_step", _BENCH + ["--json", "{dir}/missing/b.json"],
                                  "--json"),
}


def _fill(arg, values):
    for key, value in values.items():
        arg = arg.replace(key, str(value))
    return arg


@pytest.fixture(scope="module")
def bad_flag_results(tool_inputs, tmp_path_factory):
    """All cases in one process (each tool's imports take seconds): {case: (status, stderr)}."""
    root = tmp_path_factory.mktemp("bad_flags")
    (root / "dir").mkdir()
    cases = {}
    for name, (tool, args, _) in BAD_FLAGS.items():
        out = root / "out" / name
        values = {"{dir}": root / "dir", "{out}": out, "{shards}": tool_inputs / "shards",
                  "{ckpt}": tool_inputs / "ckpt"}
        folder = "benchmarks" if tool.startswith("bench_") else "tools"
        cases[name] = [str(REPO / folder / f"{tool}.py")] + [_fill(a, values) for a in args]
    (root / "run_cases.py").write_text(_RUN_CASES)
    code, output = _run([sys.executable, root / "run_cases.py", json.dumps(cases)], root,
                        timeout=180)
    assert code == 0, output[-4000:]
    return json.loads(output.strip().splitlines()[-1]), root


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_a_bad_flag_is_refused_at_parse_time(bad_flag_results, case):
    results, root = bad_flag_results
    code, stderr = results[case]
    flag = BAD_FLAGS[case][2]
    assert code == 2, stderr[-3000:]
    assert f"error: {flag}" in stderr, stderr[-3000:]
    assert not (root / "out" / case).exists()  # no store.json left behind
