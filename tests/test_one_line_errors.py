"""User errors and Ctrl-C in every tool are one line: `<tool>: error: <message>` (exit 2) or
`<tool>: interrupted; rerun the same command to resume` (exit 130), with no traceback.

Under torchrun (through `python -m sara_megatron.torchrun`) the line is printed once for the whole
job, whichever rank met the error first, before or after the process group started, while the
others wait in a collective or meet it too. The messages themselves are checked in this process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import launch
from conftest import REPO

from sara_megatron.model_folders import NotACheckpointError, check_megatron_checkpoint
from sara_megatron.priors.extraction_job import (
    ExtractionInputError,
    ExtractionJob,
    check_job_inputs,
)
from sara_megatron.priors.store import PriorStore
from sara_megatron.priors.store_format import PriorStoreError
from sara_megatron.tool_errors import UserFacingError

# Rank 1 alone meets a user error once the weights are loaded, while rank 0 goes on into the
# next collective: the line must come from rank 1, and rank 0 must end without a word.
_RANK1_USER_ERROR_AFTER_LOAD = """
import runpy, sys
import sara_megatron.checkpointing as checkpointing
import torch.distributed as dist
from sara_megatron.tool_errors import UserFacingError

original = checkpointing.load_model_weights

def load_then_fail_on_rank1(*args, **kwargs):
    original(*args, **kwargs)
    if dist.get_rank() == 1:
        raise UserFacingError("rank 1 alone found a problem after loading")

checkpointing.load_model_weights = load_then_fail_on_rank1  # the tool imports it when run
sys.argv = sys.argv[1:]  # the tool's module, then its arguments
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _one_line_job(proc, tool: str, needle: str) -> str:
    """The job's one error line; asserts it is alone, with exit status 2 and no traceback."""
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "error:" in line]
    assert proc.returncode == 2, output[-4000:]
    assert len(errors) == 1, output[-4000:]
    assert "Traceback" not in output and "failed" not in output, output[-4000:]
    assert errors[0].startswith(f"{tool}: error: ") and needle in errors[0], errors
    return errors[0]


def _train_args(data, **settings):
    sets = {"data.shards_dir": data["shards"], "data.prior_store": data["priors"],
            "model.checkpoint": data["checkpoint"], **settings}
    args = ["--config", REPO / "examples" / "tiny_cpu_sara.yaml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def _launch(script, *args, cwd):
    return launch.run(launch.torchrun_command(script, *args, launcher="sara_megatron.torchrun"),
                      cwd, timeout=300)


# --- under torchrun: one line for the job -------------------------------------------------------


def test_layers_outside_the_model_before_the_process_group(sara_data, tmp_path):
    """Every rank meets it before any collective (extract_priors checks its flags first)."""
    proc = _launch("extract_priors", "--shards", sara_data["shards"], "--checkpoint",
                   sara_data["checkpoint"], "--model", "qwen3_moe_tiny", "--output",
                   tmp_path / "priors", "--layers", "7-99", cwd=tmp_path)
    line = _one_line_job(proc, "extract_priors.py", "--layers 7-99")
    assert line.endswith("layers 7..99 are outside the model's 0..3 (4 layers)")
    assert not (tmp_path / "priors").exists()


@pytest.mark.multiprocess
def test_a_flag_error_is_printed_once_for_the_job(tmp_path):
    """argparse's errors come before `exit_at_once_on_error`: the tools' parser prints them once
    (launch.ToolArgumentParser), and every rank exits 2."""
    proc = _launch("extract_priors", "--shards", tmp_path, "--checkpoint",
                   tmp_path / "no-such-checkpoint", "--output", tmp_path / "priors", cwd=tmp_path)
    line = _one_line_job(proc, "extract_priors.py", "--checkpoint")
    assert line.endswith("no-such-checkpoint: no such directory")
    assert (proc.stdout + proc.stderr).count("usage: extract_priors.py") == 1


def test_priors_of_another_corpus_after_the_process_group(sara_data, tmp_path):
    """Every rank meets it in the preflight, after the process group started."""
    foreign = tmp_path / "priors"
    shutil.copytree(sara_data["priors"], foreign)
    store = json.loads((foreign / "store.json").read_text())
    store["metadata"]["corpus_fingerprint"] = "sha256:" + "0" * 64
    (foreign / "store.json").write_text(json.dumps(store))
    proc = _launch("train", *_train_args(sara_data, **{"data.prior_store": foreign}),
                   cwd=tmp_path)
    _one_line_job(proc, "train.py", "was extracted from a different corpus")


def test_one_rank_alone_meets_it_while_the_other_waits(sara_data, tmp_path):
    (tmp_path / "fails.py").write_text(_RANK1_USER_ERROR_AFTER_LOAD)
    cmd = launch.torchrun_command(tmp_path / "fails.py", "sara_megatron.cli.extract_priors",
                                  "--shards", sara_data["shards"], "--checkpoint",
                                  sara_data["checkpoint"], "--model", "qwen3_moe_tiny",
                                  "--output", tmp_path / "priors", "--ep", "2",
                                  launcher="sara_megatron.torchrun")
    proc = launch.run(cmd, tmp_path, timeout=300)
    _one_line_job(proc, "extract_priors.py", "rank 1 alone found a problem after loading")


def test_ctrl_c_in_train_under_torchrun(sara_data, tmp_path):
    """SIGINT to the launcher's process group, as a terminal sends it, once steps are running."""
    log = tmp_path / "out.txt"
    cmd = launch.torchrun_command("train", *_train_args(
        sara_data, **{"logging.log_interval": 1, "checkpoint.save_dir": tmp_path / "run"}),
        launcher="sara_megatron.torchrun")
    with open(log, "w") as out:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=tmp_path, env=launch.environment(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while "step 1/" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-4000:]
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log.read_text()
    assert code == 130, output[-4000:]
    assert "Traceback" not in output and "error" not in output, output[-4000:]
    lines = [line for line in output.splitlines() if "interrupted" in line]
    assert lines == ["train.py: interrupted; rerun the same command to resume"], output[-4000:]


# --- the messages, in this process ----------------------------------------------------------------


def test_an_ep_size_that_does_not_divide_the_experts_names_both(sara_data, monkeypatch):
    from sara_megatron.training import load_train_config
    from sara_megatron.training.output_checks import check_parallel_layout

    cfg = load_train_config(str(REPO / "examples" / "tiny_cpu_sara.yaml"), ["parallel.ep=3"])
    for world in (1, 2):  # one process too is told about the experts, not the world size
        with pytest.raises(UserFacingError, match=r"EP=3 must divide num_experts=8"):
            check_parallel_layout(cfg, world)
    job = ExtractionJob(shards=str(sara_data["shards"]), checkpoint=str(sara_data["checkpoint"]),
                        output="unused", model="qwen3_moe_tiny", ep=3)
    with pytest.raises(ExtractionInputError, match=r"--ep 3 .*EP=3 must divide num_experts=8"):
        check_job_inputs(job)


def test_folders_given_as_a_megatron_checkpoint_are_named(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(NotACheckpointError, match=r"model.checkpoint .*hf is a Hugging Face "
                                                  r"model folder .*convert_hf.py import --hf-dir"):
        check_megatron_checkpoint(hf, "model.checkpoint")
    run = tmp_path / "run"
    (run / "iter_0000010").mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text("10")
    with pytest.raises(NotACheckpointError, match=r"training run's checkpoint folder.*"
                                                  r"iter_0000010"):
        check_megatron_checkpoint(run, "--megatron-dir")
    with pytest.raises(NotACheckpointError, match="not a Megatron-Core checkpoint"):
        check_megatron_checkpoint(tmp_path / "run" / "iter_0000010", "--checkpoint")


def test_extract_priors_names_an_hf_folder_given_as_checkpoint(sara_data, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    job = ExtractionJob(shards=str(sara_data["shards"]), checkpoint=str(tmp_path),
                        output="unused", model="qwen3_moe_tiny")
    with pytest.raises(NotACheckpointError, match="--checkpoint .* is a Hugging Face model folder"):
        check_job_inputs(job)


def test_a_damaged_or_foreign_prior_store_is_a_user_error(sara_data, tmp_path):
    assert issubclass(PriorStoreError, UserFacingError)
    with pytest.raises(PriorStoreError, match="is not a prior store .no store.json"):
        PriorStore(sara_data["shards"])
    cut = tmp_path / "cut"
    shutil.copytree(sara_data["priors"], cut)
    (cut / "store.json").write_bytes((cut / "store.json").read_bytes()[:100])
    with pytest.raises(PriorStoreError, match=r"store.json:\d+: not valid JSON"):
        PriorStore(cut)


# --- Ctrl-C in the one-process tools ----------------------------------------------------------


def _interrupt_once(cmd, started, env):
    """Run `cmd`, send SIGINT once `started()` holds, return (status, stdout + stderr)."""
    proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out + err


@pytest.mark.multiprocess
def test_ctrl_c_in_translate_corpus_and_evaluate(tmp_path):
    from sara_megatron.chat.server import LocalChatServer
    from test_evaluation_openai import Oracle, _tool
    from test_translate_corpus import TOOL, TRANSLATOR, tool_env, write_anchors

    write_anchors(tmp_path / "en.jsonl", 40)
    # Replies slow enough (80 of them, 4 at a time) that the run is still going when the signal
    # lands, however late a loaded machine lets this process send it.
    with LocalChatServer(TRANSLATOR, latency_s=0.5) as server:
        cmd = [*TOOL, "--input", tmp_path / "en.jsonl", "--languages", "hi,sw",
               "--output", tmp_path / "corpus", "--model", "rule-translator", "--base-url",
               server.base_url, "--concurrency", "4", "--no-progress"]
        code, output = _interrupt_once(cmd, lambda: server.outcomes().count("ok") >= 5,
                                       tool_env())
    assert code == 130, output[-3000:]
    assert output.strip() == "translate_corpus: interrupted; rerun the same command to resume"

    with LocalChatServer(Oracle(), latency_s=0.5) as server:
        cmd = _tool(server.base_url, tmp_path / "eval", "--concurrency", "2", "--no-progress")
        code, output = _interrupt_once(cmd, lambda: len(server.requests) >= 3,
                                       dict(os.environ, PYTHONWARNINGS="ignore"))
    assert code == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert output.strip().splitlines()[-1] == ("evaluate: interrupted; rerun the same command "
                                               "to resume")


# --- convert_hf -------------------------------------------------------------------------------


def _convert_hf(monkeypatch, *argv):
    import importlib

    tool = importlib.import_module("sara_megatron.cli.convert_hf")
    return tool.main(list(map(str, argv)))


def test_convert_hf_export_names_the_folder_given(sara_data, tmp_path, capsys, monkeypatch):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    run = tmp_path / "run"
    shutil.copytree(sara_data["checkpoint"], run / "iter_0000005")
    (run / "latest_checkpointed_iteration.txt").write_text("5")
    for folder, needle in ((hf, "is a Hugging Face model folder"),
                           (run, f"give one of its iteration folders, e.g. {run}/iter_0000005")):
        assert _convert_hf(monkeypatch, "export", "--megatron-dir", folder,
                           "--out", tmp_path / "out") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"convert_hf.py export: error: --megatron-dir {folder} "), err
        assert needle in err and "pass --hf-dir" not in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_convert_hf_import_names_a_config_byte_that_is_not_utf8(tmp_path, capsys, monkeypatch):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_bytes(b'{"model_type": "qwen3_moe",\n "name": "caf\xe9"}')
    assert _convert_hf(monkeypatch, "import", "--hf-dir", hf, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"convert_hf.py import: error: {hf}/config.json:2: not UTF-8 (byte 0xe9 at "
                   "column 14); save the file as UTF-8"), err


def test_convert_hf_verify_names_the_failed_check_and_its_threshold():
    from sara_megatron.conversion.verify import Thresholds, failed_checks

    result = {"max_abs_diff": 0.25, "argmax_agreement": 0.75, "cosine": 0.99}
    assert failed_checks(result, Thresholds(1e-4, 1.0, 0.999)) == [
        "max |logits difference| 0.25 > --max-abs-diff 0.0001",
        "argmax agreement 0.75 < --min-argmax-agreement 1",
        "smallest per-position cosine 0.99 < --min-cosine 0.999"]
    assert failed_checks(result, Thresholds(0.5, 0.5, None)) == []


def test_shard_corpus_checks_the_tokenizer_before_reading_the_corpus(tmp_path, monkeypatch):
    import sara_megatron.data.corpus_sharding as sharding
    from sara_megatron.data.corpus_sharding import ShardingConfig, shard_corpus

    def corpus_read(*args, **kwargs):
        raise AssertionError("the corpus was read before the tokenizer was checked")

    monkeypatch.setattr(sharding, "validate_corpus", corpus_read)
    config = ShardingConfig((str(tmp_path / "corpus"),), str(tmp_path / "shards"),
                            str(tmp_path / "no-tokenizer"), seq_length=64)
    with pytest.raises(FileNotFoundError, match="no-tokenizer: no such folder"):
        shard_corpus(config)


# --- every one-process tool: bad input is one line and exit 2, a bug keeps its traceback --------


def test_every_library_error_a_user_can_cause_is_user_facing():
    """The same bad input gives one line whichever tool meets it: each library error that names
    an input to fix is a UserFacingError, and stays the ValueError (or LookupError) callers
    catch."""
    from sara_megatron.checkpointing.record import CheckpointRecordError
    from sara_megatron.construction.answering import AnswersFileError
    from sara_megatron.construction.filtering import AnswerRecordError
    from sara_megatron.construction.sources import SourceDataError
    from sara_megatron.construction.translation import RunRefused, SamplesTooLong
    from sara_megatron.conversion.errors import ConversionError
    from sara_megatron.data.corpus_format import RecordError
    from sara_megatron.data.corpus_validation import CorpusError
    from sara_megatron.evaluation.benchmarks import BenchmarkDataError
    from sara_megatron.evaluation.model_identity import ModelFolderError
    from sara_megatron.evaluation.runner import PromptsTooLong, SettingsMismatch
    from sara_megatron.priors.store_format import MissingPriorError
    from sara_megatron.tool_errors import InputError

    for error in (CheckpointRecordError, AnswersFileError, AnswerRecordError, SourceDataError,
                  RunRefused, SamplesTooLong, ConversionError, RecordError, CorpusError,
                  BenchmarkDataError, ModelFolderError, PromptsTooLong, SettingsMismatch,
                  InputError):
        assert issubclass(error, UserFacingError) and issubclass(error, ValueError), error
    assert issubclass(MissingPriorError, UserFacingError) and issubclass(MissingPriorError,
                                                                         LookupError)


def _bad_inputs(tmp_path) -> dict:
    """{tool: argv} of a run that each one-process tool must refuse for its input (not its
    flags): one line, exit 2."""
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"id": "x"}\nnot json\n')
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"model_type": "llama", "architectures": ["X"]}')
    run = tmp_path / "run"  # a training run's folder where a model folder is needed
    run.mkdir()
    (run / "latest_checkpointed_iteration.txt").write_text("5")
    not_ours = tmp_path / "not_ours"
    not_ours.mkdir()
    (not_ours / "thesis.tex").write_text("")
    return {
        "plan_layout": ["--preset", "qwen3_moe_tiny", "--gpus", "16", "--gpu-memory", "80",
                        "--layout", "2,2,8"],
        "report": ["--out", tmp_path / "r", "--run", f"a={bad_jsonl}"],
        "filter_correct": ["--input", bad_jsonl, "--output", tmp_path / "kept.jsonl"],
        "translate_corpus": ["--input", bad_jsonl, "--languages", "hi", "--output",
                             tmp_path / "corpus", "--model", "m", "--base-url",
                             "http://127.0.0.1:9/v1", "--no-progress"],
        "answer_anchors": ["--base-url", "https://api.openai.com/v1", "--model", "m",
                           "--data-dir", REPO / "tests" / "fixtures" / "construction",
                           "--output", tmp_path / "answers.jsonl", "--no-progress"],
        "evaluate": ["--backend", "hf", "--model-dir", run, "--benchmarks", "mgsm",
                     "--languages", "en", "--output", tmp_path / "eval", "--no-progress"],
        "convert_hf": ["import", "--hf-dir", not_a_model, "--out", tmp_path / "ckpt"],
        "demo": ["--work", not_ours],
    }


# The name each tool prints before `: error:`.
_PRINTED_NAME = {"plan_layout": "plan_layout.py", "report": "report.py",
                 "convert_hf": "convert_hf.py import", "demo": "demo.py"}


def _main_status(tool, argv, capsys) -> tuple[int, list[str]]:
    """Run the tool's main in this process as its console script would: (exit status, the
    stderr lines that say `error:`)."""
    import importlib

    main = importlib.import_module(f"sara_megatron.cli.{tool}").main
    try:
        status = main(list(map(str, argv)))
    except SystemExit as exit_:
        status = exit_.code
    lines = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    return status, lines


@pytest.mark.parametrize("tool", ["plan_layout", "report", "filter_correct", "translate_corpus",
                                  "answer_anchors", "evaluate", "convert_hf", "demo"])
def test_bad_input_is_one_line_and_exit_2(tool, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py"])
    status, lines = _main_status(tool, _bad_inputs(tmp_path)[tool], capsys)
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{_PRINTED_NAME.get(tool, tool)}: error: "), lines


# (tool, the module attribute a bug is planted in, its owner module)
_BUG_SITES = {
    "plan_layout": "sara_megatron.planning.planner.plan_model",
    "report": "sara_megatron.cli.report.write_report",
    "filter_correct": "sara_megatron.cli.filter_correct.filter_answers",
    "translate_corpus": "sara_megatron.cli.translate_corpus.run_translation",
    "convert_hf": "sara_megatron.conversion.hf_import.import_hf_checkpoint",
    "demo": "sara_megatron.cli.demo.run_demo",
}


def _good_inputs(tmp_path) -> dict:
    answers = REPO / "tests" / "fixtures" / "construction" / "answers_en.jsonl"
    hf = tmp_path / "hf"
    hf.mkdir()
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "ce": 1.0, "js": 0.1}\n')
    anchors = tmp_path / "en.jsonl"
    from sara_megatron.data.synthetic_corpus import synthetic_record

    anchors.write_text(json.dumps(synthetic_record("s-0", "en", 0, max_words=8)) + "\n")
    return {
        "plan_layout": ["--preset", "qwen3_moe", "--gpus", "16", "--gpu-memory", "80"],
        "report": ["--out", tmp_path / "r", "--run", f"a={log}"],
        "filter_correct": ["--input", answers, "--output", tmp_path / "kept.jsonl"],
        "translate_corpus": ["--input", anchors, "--languages", "hi", "--output",
                             tmp_path / "corpus", "--model", "m", "--base-url",
                             "http://127.0.0.1:9/v1", "--no-progress"],
        "convert_hf": ["import", "--hf-dir", hf, "--out", tmp_path / "ckpt"],
        "demo": ["--work", tmp_path / "demo"],
    }


@pytest.mark.parametrize("tool", list(_BUG_SITES))
def test_a_bug_raising_value_error_keeps_its_traceback(tool, tmp_path, capsys, monkeypatch):
    """A ValueError from inside the tool that no user input explains is a bug: it propagates
    (Python prints its traceback, exit 1), and no `error:` line claims it as a usage error."""
    import importlib

    module, _, name = _BUG_SITES[tool].rpartition(".")

    def bug(*args, **kwargs):
        raise ValueError("planted bug")

    monkeypatch.setattr(importlib.import_module(module), name, bug)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py"])
    main = importlib.import_module(f"sara_megatron.cli.{tool}").main
    with pytest.raises(ValueError, match="planted bug"):
        main(list(map(str, _good_inputs(tmp_path)[tool])))
    assert "error:" not in capsys.readouterr().err


@pytest.mark.multiprocess
def test_a_bug_is_a_traceback_and_exit_1_from_the_command_line(tmp_path):
    """The same through a process: a planted ValueError in plan_layout's planner exits 1 with
    its traceback, not 2 with a usage line."""
    script = tmp_path / "planted.py"
    script.write_text(
        "import runpy, sys\n"
        "import sara_megatron.planning.planner as planner\n"
        "def bug(*args, **kwargs):\n"
        "    raise ValueError('planted bug')\n"
        "planner.plan_model = bug\n"
        "sys.argv = ['plan_layout.py', '--preset', 'qwen3_moe', '--gpus', '16',"
        " '--gpu-memory', '80']\n"
        "runpy.run_module('sara_megatron.cli.plan_layout', run_name='__main__')\n")
    proc = launch.run([sys.executable, script], tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "ValueError: planted bug" in proc.stderr
    assert "error:" not in proc.stderr.replace("ValueError: planted bug", "")
