"""Messages that say what is wrong, for evaluate and report: a byte that is not UTF-8 (file and
line), a Megatron checkpoint where an HF folder is needed (both kinds named), a training log with
a torn last line (left out, not refused), and an item too long for the model's context (refused
before any request or forward, named)."""

import importlib
import json
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from sara_megatron.analysis.training_dynamics import read_json_log
from sara_megatron.chat.server import LocalChatServer
import launch
from launch import environment

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"


def load_tool(name):
    module = importlib.import_module(f"sara_megatron.cli.{name}")
    return module


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from sara_megatron.data.local_tokenizer import build_local_tokenizer
    from sara_megatron.demo import write_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny_model")
    texts = [line for path in sorted(FIXTURES.rglob("*.jsonl"))
             for line in path.read_text(encoding="utf-8").splitlines()]
    build_local_tokenizer(texts, root / "tokenizer", vocab_size=256)
    write_tiny_hf_model(root / "model", root / "tokenizer")
    return root / "model"


def latin1_copy(data: Path) -> Path:
    """The fixtures with mgsm/en.jsonl's second line carrying a latin-1 'é'."""
    shutil.copytree(FIXTURES, data)
    path = data / "mgsm" / "en.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"A pencil", b"A caf\xe9 pencil")
    path.write_bytes(b"\n".join(lines))
    return path


# -- a byte that is not UTF-8 ----------------------------------------------------------------------

def test_evaluate_names_the_file_and_line_of_a_latin1_byte(tmp_path, capsys):
    bad = latin1_copy(tmp_path / "data")
    with LocalChatServer(lambda body: "\\boxed{1}") as server:
        code = load_tool("evaluate").main(
            ["--backend", "openai", "--base-url", server.base_url, "--model", "sara",
             "--data-dir", str(tmp_path / "data"), "--benchmarks", "mgsm", "--languages", "en",
             "--runs", "1", "--output", str(tmp_path / "out"), "--no-progress"])
        assert not server.requests
    assert code == 2
    assert error_lines(capsys.readouterr().err) == [
        f"evaluate: error: {bad}:2: not UTF-8 (byte 0xe9 at column 20); save the file as UTF-8"]


def report_inputs(root: Path) -> dict[str, Path]:
    from sara_megatron.analysis.divergence_results import DivergenceResult, write_divergence

    log = root / "run.jsonl"
    log.write_text("".join(json.dumps({"step": s, "ce": 2.0 / s, "lb": 1.0, "js": 0.1 / s})
                           + "\n" for s in range(1, 6)), encoding="utf-8")
    divergence = root / "div.json"
    write_divergence(divergence, DivergenceResult([0, 1, 2], {"sw": [0.1, 0.05, 0.1]},
                                                  anchor="en", source={"model": "x"}))
    evaluation = root / "eval"
    evaluation.mkdir()
    (evaluation / "results.json").write_text(json.dumps(
        {"settings": {"model": "x"}, "benchmarks": {"mgsm": {"sw": {
            "runs": [50.0], "mean": 50.0, "std": None, "n": 2}}}}), encoding="utf-8")
    return {"--run": log, "--divergence": divergence, "--eval": evaluation}


@pytest.mark.parametrize("flag", ["--run", "--divergence", "--eval"])
def test_report_names_the_file_and_line_of_a_latin1_byte(flag, tmp_path, capsys):
    path = report_inputs(tmp_path)[flag]
    target = path / "results.json" if path.is_dir() else path
    data = target.read_bytes()
    cut = data.index(b"\n") + 1 if flag == "--run" else 0  # line 2 of the log, line 1 otherwise
    target.write_bytes(data[:cut] + b'{"note": "Universit\xe9"}\n' + data[cut:]
                       if flag == "--run" else data.replace(b'"x"', b'"caf\xe9"', 1))
    with pytest.raises(SystemExit) as exit_info:
        load_tool("report").main(["--out", str(tmp_path / "r"), flag, f"a={path}"])
    assert exit_info.value.code == 2
    [line] = error_lines(capsys.readouterr().err)
    data = target.read_bytes()
    bad = data.index(b"\xe9")
    line_no, column = data[:bad].count(b"\n") + 1, bad - data.rfind(b"\n", 0, bad)
    assert line == (f"report.py: error: {target}:{line_no}: not UTF-8 (byte 0xe9 at column "
                    f"{column}); save the file as UTF-8")


# -- a torn last line of a training log -------------------------------------------------------------

def test_report_leaves_out_a_torn_last_line_of_a_training_log(tmp_path, capsys):
    log = report_inputs(tmp_path)["--run"]
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"step": 6, "ce": 0.3')  # what a kill mid-write leaves
    assert [r["step"] for r in read_json_log(log)] == [1, 2, 3, 4, 5]
    load_tool("report").main(["--out", str(tmp_path / "r"), "--run", f"a={log}"])
    assert "training_dynamics.png" in (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert not error_lines(capsys.readouterr().err)


# -- a Megatron checkpoint where an HF folder is needed ---------------------------------------------

def torch_dist_folder(path: Path) -> Path:
    """The files megatron's torch_dist save writes (their content is not read)."""
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps(
        {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
         "common_backend": "torch", "common_backend_version": 1}), encoding="utf-8")
    for name in ("common.pt", "__0_0.distcp", "__0_1.distcp", ".metadata"):
        (path / name).write_bytes(b"\0")
    return path


def test_evaluate_names_a_megatron_checkpoint_given_as_model_dir(tmp_path, capsys):
    checkpoint = torch_dist_folder(tmp_path / "runs" / "x" / "iter_0000040")
    (tmp_path / "runs" / "x" / "latest_checkpointed_iteration.txt").write_text("40")
    tool = load_tool("evaluate")
    base = ["--backend", "hf", "--data-dir", str(FIXTURES), "--benchmarks", "mgsm",
            "--languages", "en", "--output", str(tmp_path / "out"), "--no-progress"]
    assert tool.main([*base, "--model-dir", str(checkpoint)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"evaluate: error: --model-dir {checkpoint} is a Megatron-Core checkpoint (torch_dist), "
        "not a Hugging Face model folder; --backend hf needs a Hugging Face model folder "
        "(config.json, safetensors weights, the tokenizer): export it with `python "
        f"tools/convert_hf.py export --megatron-dir {checkpoint} --out DIR` and evaluate DIR"]
    assert tool.main([*base, "--model-dir", str(tmp_path / "runs" / "x")]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "is a training run's checkpoint folder (iter_* Megatron-Core checkpoints)" in line
    assert not (tmp_path / "out" / "results.json").exists()


# -- an item too long for the model's context -------------------------------------------------------

def long_item_data(root: Path, question: str) -> Path:
    (root / "mgsm").mkdir(parents=True)
    rows = [json.loads(line) for line in
            (FIXTURES / "mgsm" / "en.jsonl").read_text(encoding="utf-8").splitlines()]
    rows[1]["question"] = question
    (root / "mgsm" / "en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                            encoding="utf-8")
    return root


def _limit_memory():
    # Without the length rule the tokenizer allocates until it aborts: keep that off the machine.
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


@pytest.mark.multiprocess
def test_evaluate_refuses_a_50mb_item_before_tokenizing_it(tiny_model, tmp_path):
    data = long_item_data(tmp_path / "data", "How many apples? " * (50_000_000 // 17))
    proc = subprocess.run(
        [*launch.tool("evaluate"), "--backend", "hf",
         "--model-dir", str(tiny_model), "--data-dir", str(data), "--benchmarks", "mgsm",
         "--languages", "en", "--runs", "1", "--max-new-tokens", "4", "--dtype", "float32",
         "--device", "cpu", "--output", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=environment(),
        preexec_fn=_limit_memory)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = error_lines(proc.stderr)
    assert line.startswith("evaluate: error: 1 item(s) too long for the model's context, "
                           "refused before any request or forward: mgsm/en item 1 (50000")
    assert ("that 512 tokens can hold); the rule: prompt tokens (chat template applied) + "
            "--max-new-tokens 4 <= 512 (max_position_embeddings in ") in line
    assert not (tmp_path / "out" / "items.jsonl").exists()


def test_evaluate_refuses_an_item_over_the_context_in_tokens(tiny_model, tmp_path, capsys):
    data = long_item_data(tmp_path / "data", "How many apples are there? " * 60)
    code = load_tool("evaluate").main(
        ["--backend", "hf", "--model-dir", str(tiny_model), "--data-dir", str(data),
         "--benchmarks", "mgsm", "--languages", "en", "--runs", "1", "--max-new-tokens", "4",
         "--dtype", "float32", "--device", "cpu", "--output", str(tmp_path / "out"),
         "--no-progress"])
    assert code == 2
    [line] = error_lines(capsys.readouterr().err)
    assert " item(s) too long for the model's context, refused before any request or " \
           "forward: mgsm/en item 1 (" in line
    assert " tokens + 4 > 512); the rule: prompt tokens (chat template applied)" in line
    # --max-context-tokens sets the model's context: the same item now fits.
    assert load_tool("evaluate").main(
        ["--backend", "hf", "--model-dir", str(tiny_model), "--data-dir", str(data),
         "--benchmarks", "mgsm", "--languages", "en", "--runs", "1", "--limit", "2",
         "--max-new-tokens", "1", "--max-context-tokens", "4096", "--dtype", "float32",
         "--device", "cpu", "--output", str(tmp_path / "out2"), "--no-progress"]) == 0


def test_evaluate_refuses_an_overlong_item_before_any_request(tmp_path, capsys):
    data = long_item_data(tmp_path / "data", "x" * 5000)
    with LocalChatServer(lambda body: "\\boxed{1}") as server:
        code = load_tool("evaluate").main(
            ["--backend", "openai", "--base-url", server.base_url, "--model", "sara",
             "--data-dir", str(data), "--benchmarks", "mgsm", "--languages", "en", "--runs", "1",
             "--max-prompt-chars", "4000", "--output", str(tmp_path / "out"), "--no-progress"])
        assert not server.requests
    assert code == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith("evaluate: error: 1 item(s) too long for the model's context, "
                           "refused before any request or forward: mgsm/en item 1 (")
    assert line.endswith(" characters); the rule: a prompt of at most --max-prompt-chars 4000 "
                         "characters (the served model's tokenizer is not here to count tokens)")
