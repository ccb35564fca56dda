"""Nothing wrong ends with exit 0: translate_corpus, answer_anchors and filter_correct against a
real OpenAI-wire server on 127.0.0.1 exit 1 with one line saying what fell short (requests that
failed for good, rejected shares above --max-rejected-fraction), refuse empty inputs, and a rerun
of the same command asks again for what failed. translate_corpus owns its output folder: one it
did not make from the same input and settings is refused, and a rerun leaves exactly this run's
corpus there (docs/reliability.md)."""

import importlib
import json
import subprocess
from pathlib import Path

import pytest

import launch
from sara_megatron.chat.server import Fault, LocalChatServer
from sara_megatron.construction.rule_translator import RuleTranslator
from sara_megatron.construction.translation_wire import read_request
from sara_megatron.data.synthetic_corpus import synthetic_record

REPO = Path(__file__).resolve().parents[1]
CONSTRUCTION_DATA = REPO / "tests" / "fixtures" / "construction"
TRANSLATOR = RuleTranslator()

FAULTS = {
    "rate_limit": lambda: Fault.rate_limit(0.01),  # a limit that outlasts the retries
    "server_error": lambda: Fault.server_error(500),
    "http_400": lambda: Fault.server_error(400),
    "unparsable_body": lambda: Fault.garbage_body(),
}


def load_tool(name):
    tool = importlib.import_module(f"sara_megatron.cli.{name}")
    return tool


# -- translate_corpus ------------------------------------------------------------------------------

def write_anchors(path: Path, n: int) -> list[dict]:
    records = [synthetic_record(f"demo-{i:05d}", "en", i, max_words=16) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def translate(server, anchors: Path, out: Path, *extra: str, languages: str = "hi,sw"):
    cmd = [*launch.tool("translate_corpus"), "--input", str(anchors),
           "--languages", languages, "--output", str(out), "--model", "rule-translator",
           "--base-url", server.base_url, "--concurrency", "2", "--max-retries", "1",
           "--no-progress", *extra]
    return subprocess.run(cmd, cwd=out.parent, env=launch.environment(), capture_output=True,
                          text=True, timeout=180)


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def corpus_files(out: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(out.glob("*.jsonl"))}


def is_pair(body, sample_index: int, language: str, anchors: list[dict]) -> bool:
    target, texts = read_request(body)
    return target == language and anchors[sample_index]["messages"][0]["content"] in texts.values()


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_translate_request_failures_exit_1_and_a_rerun_retries_them(tmp_path, kind):
    anchors = write_anchors(tmp_path / "en.jsonl", 3)

    def one_pair_fails(index, body):
        return FAULTS[kind]() if is_pair(body, 1, "hi", anchors) else None

    out = tmp_path / "corpus"
    with LocalChatServer(TRANSLATOR, faults=one_pair_fails) as server:
        failed = translate(server, tmp_path / "en.jsonl", out)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert last_line(failed) == (
        f"translate_corpus: 1 of 6 (record, language) pairs failed on their requests (commonest: "
        f"{kind}, 1); they are listed in {out / 'translation_failures.jsonl'} and not in the "
        "corpus; rerun the same command to ask for them again (the replies received are cached)")
    summary = json.loads(failed.stdout.strip().splitlines()[-1])
    assert (summary["translated"], summary["request_failed"], summary["rejected"]) == (5, 1, 0)
    assert corpus_files(out)["translation_failures.jsonl"] == [
        {"id": "demo-00001", "language": "hi", "reason": f"request_failed:{kind}"}]

    with LocalChatServer(TRANSLATOR) as server:  # the same command once the server is well
        resumed = translate(server, tmp_path / "en.jsonl", out)
        asked = [r.body for r in server.requests]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(asked) == 1 and is_pair(asked[0], 1, "hi", anchors)  # the failed pair, only it
    files = corpus_files(out)
    assert files["translation_failures.jsonl"] == []
    assert [r["id"] for r in files["hi.jsonl"]] == ["demo-00000", "demo-00001", "demo-00002"]


@pytest.mark.multiprocess
def test_translate_all_requests_failing_exit_1(tmp_path):
    write_anchors(tmp_path / "en.jsonl", 3)
    out = tmp_path / "corpus"
    with LocalChatServer(TRANSLATOR, faults=lambda i, body: Fault.server_error(503)) as server:
        proc = translate(server, tmp_path / "en.jsonl", out)
    assert proc.returncode == 1
    assert last_line(proc).startswith("translate_corpus: 6 of 6 (record, language) pairs failed "
                                      "on their requests (commonest: server_error, 6)")
    assert corpus_files(out)["hi.jsonl"] == corpus_files(out)["sw.jsonl"] == []


def echo_source(body):
    """A server that sends the source back instead of translating it."""
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


@pytest.mark.multiprocess
@pytest.mark.parametrize("language,reason", [("sw", "copy"), ("hi", "wrong_script")])
def test_a_server_that_echoes_the_source_fails(tmp_path, language, reason):
    write_anchors(tmp_path / "en.jsonl", 3)
    out = tmp_path / "corpus"
    with LocalChatServer(echo_source) as server:
        proc = translate(server, tmp_path / "en.jsonl", out, languages=language)
    assert proc.returncode == 1
    assert last_line(proc) == (
        f"translate_corpus: {language}: 3 of 3 pairs (100.0%) were rejected by the translation "
        f"checks, above --max-rejected-fraction 0.05 (commonest: {reason}, 3); they are listed "
        f"in {out / 'translation_failures.jsonl'}; check the translator's replies, or raise the "
        "limit")


@pytest.mark.multiprocess
def test_rejections_below_the_threshold_are_a_normal_outcome(tmp_path):
    anchors = write_anchors(tmp_path / "en.jsonl", 12)

    def loses_one_box(index, body):  # demo-00004's hi reply never keeps its \boxed{}
        if is_pair(body, 4, "hi", anchors):
            target, texts = read_request(body)
            return Fault.reply(json.dumps({k: TRANSLATOR.translate(v, target).split("\\boxed")[0]
                                           for k, v in texts.items()}, ensure_ascii=False))
        return None

    out = tmp_path / "corpus"
    with LocalChatServer(TRANSLATOR, faults=loses_one_box) as server:
        default = translate(server, tmp_path / "en.jsonl", out)  # 1 of 12 hi: 8.3% > 5%
        sent = len(server.requests)
        allowed = translate(server, tmp_path / "en.jsonl", out, "--max-rejected-fraction", "0.1")
        assert len(server.requests) == sent  # the limit is no setting of the corpus: all cached
    assert default.returncode == 1 and last_line(default).startswith(
        "translate_corpus: hi: 1 of 12 pairs (8.3%) were rejected by the translation checks, "
        "above --max-rejected-fraction 0.05 (commonest: lost_boxed, 1)")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    summary = json.loads(allowed.stdout.strip().splitlines()[-1])
    assert (summary["translated"], summary["rejected"], summary["failure_reasons"]) == \
        (23, 1, {"lost_boxed": 1})


@pytest.mark.multiprocess
def test_translate_refuses_an_empty_input(tmp_path):
    (tmp_path / "en.jsonl").write_text("")
    with LocalChatServer(TRANSLATOR) as server:
        proc = translate(server, tmp_path / "en.jsonl", tmp_path / "corpus")
        assert server.requests == []
    assert proc.returncode == 2
    assert last_line(proc) == f"translate_corpus: error: {tmp_path / 'en.jsonl'} holds no records"
    assert not (tmp_path / "corpus").exists()


@pytest.mark.multiprocess
def test_a_refused_run_leaves_no_folder_that_refuses_the_corrected_command(tmp_path):
    write_anchors(tmp_path / "en.jsonl", 2)
    out = tmp_path / "corpus"

    def unknown_model(index, body):
        return Fault.server_error(404) if body["model"] != "rule-translator" else None

    with LocalChatServer(TRANSLATOR, faults=unknown_model) as server:
        typo = translate(server, tmp_path / "en.jsonl", out, "--model", "rule-translater")
        assert typo.returncode == 2 and "(http_404)" in last_line(typo)
        assert not out.exists()
        corrected = translate(server, tmp_path / "en.jsonl", out)
    assert corrected.returncode == 0, corrected.stderr[-2000:]


@pytest.mark.multiprocess
def test_translate_refuses_a_folder_it_did_not_make(tmp_path):
    write_anchors(tmp_path / "en.jsonl", 2)
    foreign = tmp_path / "corpus"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's")
    with LocalChatServer(TRANSLATOR) as server:
        for extra in ((), ("--dry-run",)):
            proc = translate(server, tmp_path / "en.jsonl", foreign, *extra)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
            assert last_line(proc) == (
                f"translate_corpus: error: {foreign} is not empty and was not made by "
                "translate_corpus (it has no translation_plan.json): write to a new or empty "
                "output folder")
        assert server.requests == []
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.multiprocess
def test_translate_refuses_a_folder_made_from_other_input_or_settings(tmp_path):
    write_anchors(tmp_path / "en.jsonl", 2)
    write_anchors(tmp_path / "other.jsonl", 3)
    out = tmp_path / "corpus"
    with LocalChatServer(TRANSLATOR) as server:
        assert translate(server, tmp_path / "en.jsonl", out).returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        sent = len(server.requests)
        other_input = translate(server, tmp_path / "other.jsonl", out)
        other_settings = translate(server, tmp_path / "en.jsonl", out, "--temperature", "0.3")
        assert len(server.requests) == sent
    for proc, differs in ((other_input, "input"), (other_settings, "settings")):
        assert proc.returncode == 2
        assert last_line(proc) == (
            f"translate_corpus: error: {out} holds a corpus made from other inputs or settings "
            f"(differs in: {differs}); write to a new output directory or delete this one")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.multiprocess
def test_a_rerun_leaves_exactly_this_runs_corpus(tmp_path):
    anchors = write_anchors(tmp_path / "en.jsonl", 2)
    out = tmp_path / "corpus"
    with LocalChatServer(TRANSLATOR) as server:
        assert translate(server, tmp_path / "en.jsonl", out).returncode == 0
        fewer = translate(server, tmp_path / "en.jsonl", out, languages="hi")
        hi_only = corpus_files(out)
        more = translate(server, tmp_path / "en.jsonl", out, languages="sw,hi")
    assert fewer.returncode == 0 and f"removed {out / 'sw.jsonl'}: not a language of this run" \
        in fewer.stderr
    assert sorted(hi_only) == ["en.jsonl", "hi.jsonl", "translation_failures.jsonl"]
    assert hi_only["en.jsonl"] == anchors and len(hi_only["hi.jsonl"]) == 2
    assert more.returncode == 0
    assert sorted(corpus_files(out)) == ["en.jsonl", "hi.jsonl", "sw.jsonl",
                                         "translation_failures.jsonl"]


# -- answer_anchors ----------------------------------------------------------------------------------

def answer(server, tmp_path, capsys, *extra, data_dir=CONSTRUCTION_DATA):
    rc = load_tool("answer_anchors").main(
        ["--base-url", server.base_url, "--model", "local", "--data-dir", str(data_dir),
         "--output", str(tmp_path / "answers.jsonl"), "--max-retries", "1", "--no-progress",
         *extra])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_answer_anchors_request_failures_exit_1(tmp_path, capsys, kind):
    with LocalChatServer(lambda body: "\\boxed{1}", faults=lambda i, body: FAULTS[kind]()) as server:
        rc, captured = answer(server, tmp_path, capsys, "--sources", "gsm8k", "--limit", "2")
    assert rc == 1
    assert captured.err.strip().splitlines()[-1] == (
        f"answer_anchors: 2 of 2 samples failed on their requests (commonest: {kind}, 2); they "
        f"are listed in {tmp_path / 'answers.failures.jsonl'} and not in the answers file; rerun "
        "the same command to ask for them again (the answers received stay)")
    assert json.loads(captured.out.strip().splitlines()[-1])["complete"] is False


def test_answer_anchors_refuses_an_empty_source(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "train.jsonl").write_text("")
    with LocalChatServer(lambda body: "\\boxed{1}") as server:
        rc, captured = answer(server, tmp_path, capsys, "--sources", "gsm8k", data_dir=data)
        assert server.requests == []
    assert rc == 2 and captured.out == ""  # no summary claiming "complete": true
    assert captured.err.strip() == (f"answer_anchors: error: {data / 'gsm8k' / 'train.jsonl'} "
                                    "holds no gsm8k samples (en): nothing to answer")
    with pytest.raises(SystemExit) as refused:
        load_tool("answer_anchors").main(["--model", "m", "--base-url", "http://127.0.0.1:9/v1",
                                          "--output", str(tmp_path / "a.jsonl"), "--limit", "0"])
    assert refused.value.code == 2
    assert "answer_anchors: error: --limit must be >= 1, got 0" in capsys.readouterr().err


# -- filter_correct ------------------------------------------------------------------------------------

def write_answers(path: Path, output: str, finish_reason: str = "stop") -> int:
    rows = [json.loads(line) for line in (CONSTRUCTION_DATA / "answers_en.jsonl").read_text().splitlines()]
    rows = list({r["id"]: r for r in rows}.values())  # the fixture's duplicate aside
    path.write_text("".join(json.dumps({**r, "output": output, "finish_reason": finish_reason})
                            + "\n" for r in rows))
    return len(rows)


def filter_answers(tmp_path, capsys, *extra):
    rc = load_tool("filter_correct").main(["--input", str(tmp_path / "answers.jsonl"),
                                           "--output", str(tmp_path / "anchors.jsonl"), *extra])
    return rc, capsys.readouterr()


def test_filter_correct_keeping_nothing_exits_1(tmp_path, capsys):
    n = write_answers(tmp_path / "answers.jsonl", "So the answer is \\boxed{123456}.")
    rc, captured = filter_answers(tmp_path, capsys)
    assert rc == 1
    assert captured.err.strip().splitlines()[-1] == (
        f"filter_correct: kept none of the {n} samples (commonest reason: wrong, {n}): the output "
        "corpus is empty")
    assert (tmp_path / "anchors.jsonl").read_text() == ""


def test_filter_correct_unjudged_replies_above_the_threshold_exit_1(tmp_path, capsys):
    write_answers(tmp_path / "answers.jsonl", "Let me think step by step about", "length")
    rc, captured = filter_answers(tmp_path, capsys)
    lines = captured.err.strip().splitlines()
    assert rc == 1
    assert "filter_correct: gsm8k: 6 of 6 replies (100.0%) could not be judged (cut by the length " \
           "limit, or no \\boxed{} answer), above --max-rejected-fraction 0.05 (commonest: " \
           "truncated, 6); check the model's replies (its --max-tokens, its thinking), or raise " \
           "the limit" in lines
    assert any(line.startswith("filter_correct: mmlu_prox: 6 of 6 replies") for line in lines)
    # Wrong answers are what the filter is for: however many, they are no failure.
    rows = [json.loads(line) for line in (CONSTRUCTION_DATA / "answers_en.jsonl").read_text().splitlines()]
    kept_one = [{**r, "output": "\\boxed{0}" if i else r["output"], "finish_reason": "stop"}
                for i, r in enumerate(rows[:5])]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept_one))
    rc, captured = filter_answers(tmp_path, capsys)
    assert rc == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["kept"] == 1


def test_filter_correct_refuses_an_empty_input(tmp_path, capsys):
    (tmp_path / "answers.jsonl").write_text("")
    rc, captured = filter_answers(tmp_path, capsys)
    assert rc == 2 and captured.out == ""
    assert captured.err.strip() == (f"filter_correct: error: no answer records in "
                                    f"{tmp_path / 'answers.jsonl'}: nothing to filter")
    assert not (tmp_path / "anchors.jsonl").exists()
