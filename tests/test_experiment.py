"""`make experiment` in small: the task generator's guarantees, and the reduced experiment run end
to end through tools/experiment.py (base model from scratch, FFT and SARA, evaluation, report,
verdict), with the report's numbers parsed back and checked against the evaluation files."""

import dataclasses
import json
import re
import sys
from pathlib import Path

import launch
import pytest

from sara_megatron.answers import normalize_number
from sara_megatron.evaluation.records import read_item_records, read_results
from sara_megatron.experiment.base_model import BaseSettings, base_key
from sara_megatron.experiment.task import (
    ANCHOR, FINE_TUNE_PEOPLE, LANGUAGES, PEOPLE, TARGETS, TaskSettings, item_keys, lookup_items,
    math_items, world_facts)
from sara_megatron.experiment.task_files import task_record

REPO = Path(__file__).resolve().parents[1]


def test_translations_keep_the_answer_and_differ_in_surface():
    settings = TaskSettings()
    items = math_items(settings, 60, "t") + lookup_items(settings, "t")
    for item in items:
        questions = {lang: item.question(lang) for lang in LANGUAGES}
        assert len(set(questions.values())) == len(LANGUAGES)  # every language its own surface
        for lang in LANGUAGES:
            response = task_record(item, lang)["messages"][-1]["content"]
            boxed = re.findall(r"\\boxed\{([^}]*)\}", response)[-1]
            if item.kind == "math":  # native digits in bn still read as the same number
                assert normalize_number(boxed) == float(item.answer)
            else:
                assert boxed == item.answer
    # bn writes Bengali digits, te Telugu script with ASCII digits, sw Latin letters
    sample = items[0]
    assert re.search("[০-৯]", sample.question("bn")) and not re.search("[0-9]", sample.question("bn"))
    assert re.search("[\u0c00-\u0c7f]", sample.question("te"))
    assert sample.question("sw").isascii()


def test_world_and_splits():
    settings = TaskSettings()
    facts = world_facts(settings.world_seed)
    for attribute in facts[PEOPLE[0]]:  # each value held by two of the eight people
        values = [facts[p][attribute] for p in PEOPLE]
        assert all(values.count(v) == 2 for v in set(values))
    held_out = math_items(settings, 30, "eval")
    train = math_items(settings, 500, "finetune", exclude=item_keys(held_out))
    assert not item_keys(held_out) & item_keys(train)
    assert math_items(settings, 30, "eval") == held_out  # deterministic
    tuned = lookup_items(settings, "finetune", 2, FINE_TUNE_PEOPLE)
    assert {dict(i.slots)["p"] for i in tuned} == set(FINE_TUNE_PEOPLE)
    assert len({i.item_id for i in tuned}) == len(tuned) == 2 * len(FINE_TUNE_PEOPLE) * 3


def test_base_key_follows_settings():
    settings = BaseSettings()
    assert base_key(settings) == base_key(BaseSettings())
    assert base_key(settings) != base_key(dataclasses.replace(settings, train_steps=7))
    assert base_key(settings) != base_key(dataclasses.replace(
        settings, task=dataclasses.replace(settings.task, world_seed=1)))


ROW = re.compile(r"^\| (MGSM|Global-MMLU) \| ([^|]+) \| (.+) \|$")


def _accuracy_rows(report: str) -> dict:
    """{(benchmark title, model): {language: (mean, std or None)}} from the report's table."""
    section = report.split("## Accuracy", 1)[1].split("\n## ", 1)[0]
    lines = section.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    languages = header[2:-1]
    rows = {}
    for line in lines[2:]:
        match = ROW.match(line)
        if not match:
            continue
        cells = [c.strip() for c in match.group(3).split("|")][:-1]
        parsed = {}
        for lang, cell in zip(languages, cells):
            parts = cell.split("±")
            parsed[lang] = (float(parts[0]), float(parts[1]) if len(parts) > 1 else None)
        rows[(match.group(1), match.group(2).strip())] = parsed
    return rows


@launch.early_launch("reduced_experiment")
def reduced_experiment_command(folder):
    """The reduced experiment starts with the session (about 4 minutes, mostly one core busy)."""
    return {"cmd": [sys.executable, REPO / "tools" / "experiment.py", "--reduced", "--work",
                    folder / "exp"], "cwd": REPO, "timeout": 900}


@pytest.fixture(scope="module")
def reduced_experiment(early_launches):
    background = early_launches["reduced_experiment"]
    proc = background.wait()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return background.folder / "exp"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_reduced_experiment_report_parses_back(reduced_experiment):
    work = reduced_experiment
    report = (work / "report.md").read_text()
    for png in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (work / png).is_file() and (work / png).stat().st_size > 1000
    rows = _accuracy_rows(report)
    titles = {"mgsm": "MGSM", "global_mmlu": "Global-MMLU"}
    folders = {"base": work / "eval" / "base", "FFT": work / "eval" / "fft",
               "SARA": work / "eval" / "sara"}
    for name, folder in folders.items():
        results = read_results(folder)["benchmarks"]
        records = read_item_records(folder / "items.jsonl")
        for benchmark, per_language in results.items():
            assert set(per_language) == set(LANGUAGES)
            for lang, entry in per_language.items():
                mean, std = rows[(titles[benchmark], name)][lang]
                assert mean == pytest.approx(entry["mean"], abs=0.006)
                assert (std is None) == (entry["std"] is None)  # one seed: no spread
                # the accuracy is the share of that language's items answered right
                mine = [r for r in records if r["benchmark"] == benchmark and r["language"] == lang]
                assert len(mine) == entry["n"]
                assert entry["mean"] == pytest.approx(100 * sum(r["correct"] for r in mine) / len(mine))
    # a method's merged folder is its seed's evaluation
    seed = read_results(work / "runs" / "sara-s1" / "eval")["benchmarks"]
    merged = read_results(folders["SARA"])["benchmarks"]
    assert {b: {l: e["runs"] for l, e in p.items()} for b, p in merged.items()} == \
        {b: {l: e["runs"] for l, e in p.items()} for b, p in seed.items()}
    # the verdict's difference is the mean over targets of SARA's accuracies minus FFT's
    fft = read_results(folders["FFT"])["benchmarks"]
    verdict = report.split("## Verdict", 1)[1]
    line = next(l for l in verdict.splitlines() if l.startswith("- arithmetic") and "SARA" in l)
    difference = sum(merged["mgsm"][t]["mean"] - fft["mgsm"][t]["mean"] for t in TARGETS) / len(TARGETS)
    if abs(difference) < 1e-9:
        assert "tied" in line
    else:
        stated = float(re.search(r"(-?\d+\.\d+) points", line).group(1))
        assert stated == pytest.approx(abs(difference), abs=0.006)
        assert ("behind" in line) == (difference < 0)
    assert "### Wall time" in verdict and "base:train" in verdict


@pytest.mark.multiprocess
@pytest.mark.slow
def test_reduced_experiment_base_model_learned_the_anchor(reduced_experiment):
    base = read_results(reduced_experiment / "eval" / "base")["benchmarks"]
    assert base["mgsm"][ANCHOR]["mean"] > 0.0  # chance for a free-form number is ~0
    assert base["global_mmlu"][ANCHOR]["mean"] > 25.0  # four options
    log = [json.loads(l) for l in next((reduced_experiment / "base").glob("*/train.jsonl"))
           .read_text().splitlines()]
    assert log[-1]["ce"] < log[0]["ce"] / 2


@pytest.mark.multiprocess
@pytest.mark.slow
def test_reduced_experiment_reuses_the_cached_base(reduced_experiment, capsys, monkeypatch):
    from sara_megatron.experiment import base_model as base_module
    from sara_megatron.experiment.run import reduced_settings

    (folder,) = (reduced_experiment / "base").iterdir()
    done = json.loads((folder / "done.json").read_text())
    # The key covers the code's source too, which may change while the suite runs: pin it to the
    # version the run recorded, then the same settings must find the same folder.
    monkeypatch.setattr(base_module, "code_version", lambda: done["code_version"])
    settings = reduced_settings()
    assert base_module.base_key(settings.base) == folder.name
    assert base_module.base_key(settings.base, "another version") != folder.name
    held_out = math_items(settings.base.task, settings.eval_math_items, "eval")
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    model = base_module.ensure_base_model(reduced_experiment, settings.base, held_out)
    assert model.cached and model.folder == folder
    assert (model.hf_dir / "model.safetensors").is_file()
    assert "cached" in capsys.readouterr().out
    # nothing was rebuilt: every file of the cached model (its logs included) is as it was
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before
