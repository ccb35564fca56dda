"""`make experiment` in small: the task generator's guarantees, and the reduced experiment run end
to end through tools/experiment.py (base model from scratch, FFT and SARA, evaluation, report,
verdict), with the report's numbers parsed back and checked against the evaluation files."""

import dataclasses
import json
import re
from pathlib import Path

import launch
import pytest

from sara_megatron.answers import normalize_number
from sara_megatron.evaluation.records import read_item_records, read_results
from sara_megatron.experiment.base_model import BaseSettings, base_key
from sara_megatron.experiment.task import (
    ANCHOR, LANGUAGES, TARGETS, TaskSettings, fine_tune_people, held_out_people, item_keys,
    lookup_items, math_items, world_facts, world_people)
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
            if item.kind == "math":
                assert normalize_number(boxed) == float(item.answer)
            else:
                assert boxed == item.answer
    # bn in Bengali script, te in Telugu script, sw in Latin letters; numbers in ASCII digits in
    # every language (the base computes in them)
    sample = items[0]
    numbers = re.findall("[0-9]+", sample.question(ANCHOR))
    for lang in LANGUAGES:
        assert re.findall("[0-9]+", sample.question(lang)) == numbers
        assert not re.search("[০-৯]", task_record(sample, lang)["messages"][-1]["content"])
    assert re.search("[\u0980-\u09ff]", sample.question("bn"))
    assert re.search("[\u0c00-\u0c7f]", sample.question("te"))
    assert sample.question("sw").isascii()


def test_world_and_splits():
    settings = TaskSettings()
    people = world_people(settings)
    facts = world_facts(settings.world_seed, settings.people)
    assert set(facts) == set(people) and len(people) == settings.people == 44
    for attribute in facts[people[0]]:  # each of the four values held by 11 of the 44 people
        values = [facts[p][attribute] for p in people]
        assert sorted(values.count(v) for v in set(values)) == [11] * 4
    held_out = math_items(settings, 100, "eval")
    train = math_items(settings, 500, "finetune", exclude=item_keys(held_out))
    assert not item_keys(held_out) & item_keys(train)
    assert math_items(settings, 100, "eval") == held_out  # deterministic
    tuned = lookup_items(settings, "finetune", 2, fine_tune_people(settings))
    assert {dict(i.slots)["p"] for i in tuned} == set(fine_tune_people(settings))
    assert len({i.item_id for i in tuned}) == len(tuned) == 2 * settings.fine_tune_people * 3
    # the transfer set: at least 100 lookups per language about people fine-tuning never names
    transfer = lookup_items(settings, "eval", people=held_out_people(settings))
    assert len(transfer) >= 100
    assert not {dict(i.slots)["p"] for i in transfer} & set(fine_tune_people(settings))
    with pytest.raises(ValueError):
        TaskSettings(people=45)


def test_base_corpus_shows_every_target_but_no_target_fact():
    """The base reads every target language (stories and lookup questions), and every fact in
    the anchor only: no target-language record holds a fact sentence or an answer."""
    from sara_megatron.experiment.task import FACT_WORDS, render_sentence
    from sara_megatron.experiment.task_files import base_corpus_records

    task = TaskSettings(people=12, fine_tune_people=4)
    records = base_corpus_records(math_items(task, 5, "base"), math_items(task, 3, "text"),
                                  task, fact_copies=2)
    facts = world_facts(task.world_seed, task.people)
    for lang in TARGETS:
        texts = [m["content"] for r in records[lang] for m in r["messages"]]
        assert len(records[lang]) == 3 + 12 * 3  # stories + every lookup question
        for person, attributes in facts.items():
            for attribute, value in attributes.items():
                fact = render_sentence(FACT_WORDS[attribute], lang, {"p": person, "v": value})
                assert not any(fact in t for t in texts)
        assert not any("boxed" in t for t in texts)
    anchor_facts = [r for r in records[ANCHOR] if r["id"].startswith("fact-")]
    assert len(anchor_facts) == 2 * 12 * 3


def test_base_key_follows_settings():
    settings = BaseSettings()
    assert base_key(settings) == base_key(BaseSettings())
    assert base_key(settings) != base_key(dataclasses.replace(settings, train_steps=7))
    assert base_key(settings) != base_key(dataclasses.replace(
        settings, task=dataclasses.replace(settings.task, world_seed=1)))


def test_baseline_variants_train_with_their_settings(tmp_path):
    """The opt-in arms that compare a baseline's settings on the same seeds: AES with the
    released calibration, ShifCon with this project's earlier contrast; the plain ShifCon arm
    trains with the released defaults. Each config loads as training reads it."""
    from types import SimpleNamespace

    from sara_megatron.experiment.run import ExperimentSettings, finetune_config
    from sara_megatron.training.config import load_train_config

    base = SimpleNamespace(folder=tmp_path / "base", checkpoint=tmp_path / "base" / "ckpt")
    (tmp_path / "divergence").mkdir()
    (tmp_path / "divergence" / "base.json").write_text(
        json.dumps({"suggested_range": {"first_layer": 2, "last_layer": 5}}))

    def config(method):
        raw = finetune_config(tmp_path, ExperimentSettings(), base, method, 1, tmp_path / "run",
                              (2, 5), shift_area=(1, 3))
        path = tmp_path / f"{method}.yaml"
        path.write_text(json.dumps(raw))
        return load_train_config(str(path))

    assert config("aes").aes.calibration == "measured"
    assert config("aes_authors").aes.calibration == "authors"
    released, earlier = config("shifcon").shifcon, config("shifcon_earlier").shifcon
    assert (released.temperature, released.contrastive_coeff, released.ce_weight,
            released.symmetric, released.anchor_gradient, released.contrast_layers) == (
        1.0, 2.0, 0.5, True, True, "area")
    assert (earlier.temperature, earlier.contrastive_coeff, earlier.ce_weight, earlier.symmetric,
            earlier.anchor_gradient, earlier.contrast_layers) == (
        0.05, 1.0, 1.0, False, False, "shift_back")
    assert (earlier.shift_layer, earlier.shift_back_layer) == (1, 3)
    assert (released.shift_layer, released.shift_back_layer) == (1, 3)
    with pytest.raises(ValueError, match="shifcon needs ShifCon's area"):
        finetune_config(tmp_path, ExperimentSettings(), base, "shifcon", 1, tmp_path / "run",
                        (2, 5))
    assert released.language_vectors.endswith("/language_vectors.safetensors")
    assert earlier.language_vectors.endswith("/language_vectors_token_mean.safetensors")


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
    """The reduced experiment starts with the session (about 5 minutes on two idle cores)."""
    return {"cmd": [*launch.tool("experiment"), "--reduced", "--work",
                    folder / "exp"], "cwd": REPO, "timeout": 1200}


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
                assert (std is None) == (entry["std"] is None) == (name == "base")  # seeds: spread
                # the accuracy is the share of that language's items answered right, over seeds
                mine = [r for r in records if r["benchmark"] == benchmark and r["language"] == lang]
                assert len(mine) == entry["n"] * len(entry["runs"])
                assert entry["mean"] == pytest.approx(100 * sum(r["correct"] for r in mine) / len(mine))
    # a method's merged folder holds its seeds' evaluations, run r = seed r
    merged = read_results(folders["SARA"])["benchmarks"]
    seeds = [read_results(work / "runs" / f"sara-s{s}" / "eval")["benchmarks"] for s in (1, 2)]
    assert {b: {l: e["runs"] for l, e in p.items()} for b, p in merged.items()} == \
        {b: {l: [seed[b][l]["runs"][0] for seed in seeds] for l in p} for b, p in seeds[0].items()}
    assert "### Wall time" in report and "base:train" in report


def _held_out_accuracy_by_seed(folder, benchmark, languages, held_out):
    """seed -> percent right over the held-out items of `languages`, recomputed from items.jsonl."""
    by_seed = {}
    for r in read_item_records(folder / "items.jsonl"):
        if r["benchmark"] == benchmark and r["language"] in languages and r["item_id"] in held_out:
            by_seed.setdefault(r["run"], []).append(r["correct"])
    return {seed: 100 * sum(flags) / len(flags) for seed, flags in by_seed.items()}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_reduced_experiment_summary_holds_the_numbers_the_report_states(reduced_experiment):
    """summary.json: exactly its fields; each method's accuracy, retention and paired t-test
    recomputed from the evaluation files; the verdict follows the numbers; report.md states
    the summary's numbers."""
    from scipy import stats

    from sara_megatron.evaluation.significance import minimum_detectable_effect
    from sara_megatron.experiment.run import held_out_items, reduced_settings

    work = reduced_experiment
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary) == {"seeds", "items_per_language", "aligned_layers", "methods", "verdict",
                            "stage_seconds"}
    settings = reduced_settings()
    assert summary["seeds"] == settings.seeds == 2
    math, transfer, seen = held_out_items(settings)
    assert summary["items_per_language"] == {
        "mgsm": {"held_out": len(math), "seen_in_finetuning": 0},
        "global_mmlu": {"held_out": len(transfer), "seen_in_finetuning": len(seen)}}
    # the aligned layers are the base's divergence file's suggested range, and SARA trained them
    suggested = json.loads((work / "divergence" / "base.json").read_text())["suggested_range"]
    layers = summary["aligned_layers"]["layers"]
    assert layers == list(range(suggested["first_layer"], suggested["last_layer"] + 1))
    sara_config = (work / "runs" / "sara-s1" / "train.yaml").read_text()
    assert "divergence/base.json" in sara_config
    held_out = {"mgsm": {str(i) for i in range(len(math))},
                "global_mmlu": {i.item_id for i in transfer}}
    base_anchor = _held_out_accuracy_by_seed(work / "eval" / "base", "global_mmlu", {ANCHOR},
                                             held_out["global_mmlu"])[1]
    accuracy = {}
    for name, folder in (("FFT", "fft"), ("SARA", "sara")):
        entry = summary["methods"][name]
        for benchmark in ("mgsm", "global_mmlu"):
            by_seed = _held_out_accuracy_by_seed(work / "eval" / folder, benchmark, set(TARGETS),
                                                 held_out[benchmark])
            assert sorted(by_seed) == [1, 2]
            accuracy[name, benchmark] = by_seed
            assert entry["target_accuracy"][benchmark] == pytest.approx(sum(by_seed.values()) / 2)
        anchor = _held_out_accuracy_by_seed(work / "eval" / folder, "global_mmlu", {ANCHOR},
                                            held_out["global_mmlu"])
        assert entry["anchor_retention"] == pytest.approx(sum(anchor.values()) / 2 / base_anchor)
        assert entry["divergence_ratio"] > 0
    sara = summary["methods"]["SARA"]
    lines = summary["verdict"].splitlines()
    assert len(lines) == 2
    retentions = [summary["methods"][m]["anchor_retention"] for m in ("SARA", "FFT")]
    for benchmark, line in zip(("mgsm", "global_mmlu"), lines):
        # A void lookup comparison's line says why it is void (below), whatever the seeds did.
        void = benchmark == "global_mmlu" and min(retentions) < 0.9
        c = sara["tests_against_fft"][benchmark]
        ours, theirs = accuracy["SARA", benchmark], accuracy["FFT", benchmark]
        differences = [ours[s] - theirs[s] for s in (1, 2)]
        assert c["difference"] == pytest.approx(sum(differences) / 2)
        if differences[0] != differences[1]:
            expected = stats.ttest_rel([ours[1], ours[2]], [theirs[1], theirs[2]],
                                       alternative="greater")
            assert c["paired_t"]["p_one_tailed"] == pytest.approx(expected.pvalue)
            std = abs(differences[0] - differences[1]) / 2 ** 0.5
            assert sara["minimum_detectable_effect"][benchmark] == pytest.approx(
                minimum_detectable_effect(std, 2))
        else:  # no spread across seeds: nothing to size an effect by
            assert sara["minimum_detectable_effect"][benchmark] is None
            assert void or "did not vary" in line
        for key in ("mcnemar", "bootstrap"):
            assert 0.0 <= c[key]["p_one_tailed"] <= 1.0
        if void:
            assert "void" in line and "forgetting" in line
        elif abs(c["difference"]) < 1e-9:
            assert "tied" in line
        else:
            assert ("behind" in line) == (c["difference"] < 0)
            assert f"{abs(c['difference']):.2f} points" in line
    # the report's verdict section is the summary's: its sentences and its numbers
    verdict = (work / "report.md").read_text().split("## Verdict", 1)[1]
    for line in lines:
        assert f"- {line}" in verdict
    for name in ("FFT", "SARA"):
        entry = summary["methods"][name]
        row = next(l for l in verdict.splitlines() if l.startswith(f"| {name} |"))
        assert f"{entry['target_accuracy']['mgsm']:.2f}" in row
        assert f"{entry['anchor_retention']:.2f}" in row
    for stage in ("base:train", "train:sara-s2", "evaluate:fft-s1", "divergence:base"):
        assert summary["stage_seconds"][stage] > 0


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
    from sara_megatron.experiment.run import held_out_items, reduced_settings

    (folder,) = (reduced_experiment / "base").iterdir()
    done = json.loads((folder / "done.json").read_text())
    # The key covers the code's source too, which may change while the suite runs: pin it to the
    # version the run recorded, then the same settings must find the same folder.
    monkeypatch.setattr(base_module, "code_version", lambda: done["code_version"])
    settings = reduced_settings()
    assert base_module.base_key(settings.base) == folder.name
    assert base_module.base_key(settings.base, "another version") != folder.name
    math, transfer, _ = held_out_items(settings)
    held_out = math + transfer
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    model = base_module.ensure_base_model(reduced_experiment, settings.base, held_out)
    assert model.cached and model.folder == folder
    assert (model.hf_dir / "model.safetensors").is_file()
    assert "cached" in capsys.readouterr().out
    # nothing was rebuilt: every file of the cached model (its logs included) is as it was
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before


def _write_items(folder, flags):
    """items.jsonl from {(benchmark, language, run): [correct, ...]} (item ids by benchmark)."""
    from sara_megatron.evaluation.records import ItemRecordWriter

    folder.mkdir(parents=True)
    with ItemRecordWriter(folder / "items.jsonl") as writer:
        for (benchmark, language, run), correct in flags.items():
            prefix = "" if benchmark == "mgsm" else "h"
            for i, ok in enumerate(correct):
                writer.write(dict(benchmark=benchmark, language=language, run=run,
                                  item_id=f"{prefix}{i}", output="", extracted="", gold="",
                                  correct=bool(ok)))
            if benchmark == "global_mmlu":  # a seen item, always right: left out of every number
                writer.write(dict(benchmark=benchmark, language=language, run=run, item_id="s0",
                                  output="", extracted="", gold="", correct=True))


def test_summary_numbers_and_void_lookups_when_the_anchor_is_forgotten(tmp_path):
    """write_summary on hand-made evaluations: accuracies over held-out target items, retention,
    the divergence ratio in the aligned range, the paired t over seeds and its minimum detectable
    effect; SARA's lookups are void (it kept half the anchor's facts), its arithmetic is not."""
    import types

    from scipy import stats

    from sara_megatron.analysis.divergence_results import DivergenceResult, write_divergence
    from sara_megatron.evaluation.significance import minimum_detectable_effect
    from sara_megatron.experiment.summary import write_summary
    from sara_megatron.experiment.tool_runs import StepTimer

    ten = lambda k: [1] * k + [0] * (10 - k)  # noqa: E731
    flags = {"base": {("mgsm", lang, 1): ten(9 if lang == ANCHOR else 1) for lang in LANGUAGES}}
    flags["base"].update({("global_mmlu", lang, 1): ten(10 if lang == ANCHOR else 3)
                          for lang in LANGUAGES})
    right = {"FFT": {1: (4, 3), 2: (6, 3)}, "SARA": {1: (5, 6), 2: (8, 4)}}  # (mgsm, lookups)
    for name, seeds in right.items():
        flags[name] = {}
        for seed, (math_k, lookup_k) in seeds.items():
            for lang in TARGETS:
                flags[name][("mgsm", lang, seed)] = ten(math_k)
                flags[name][("global_mmlu", lang, seed)] = ten(lookup_k)
            flags[name][("mgsm", ANCHOR, seed)] = ten(9)
            flags[name][("global_mmlu", ANCHOR, seed)] = ten(10 if name == "FFT" else 5)
    folders = {}
    for name, table in flags.items():
        _write_items(tmp_path / name, table)
        folders[name] = tmp_path / name
    curves = {"before": [0.4, 0.2, 0.1, 0.5], "FFT": [0.4, 0.3, 0.3, 0.5],
              "SARA": [0.4, 0.1, 0.05, 0.5]}
    divergences = {}
    for name, curve in curves.items():
        divergences[name] = tmp_path / f"{name}.json"
        write_divergence(divergences[name], DivergenceResult(
            [0, 1, 2, 3], {lang: curve for lang in TARGETS}, anchor=ANCHOR,
            suggested_range={"first_layer": 1, "last_layer": 2, "alpha": 0.5, "window": 3,
                             "rule": "r"},
            shift_area={"shift_layer": 0, "shift_back_layer": 2} if name == "before" else None))
    timer = StepTimer()
    timer.add("base:train", 3.0)
    held_out = {"mgsm": {str(i) for i in range(10)}, "global_mmlu": {f"h{i}" for i in range(10)}}
    items = {"mgsm": {"held_out": 10, "seen_in_finetuning": 0},
             "global_mmlu": {"held_out": 10, "seen_in_finetuning": 1}}
    summary = write_summary(tmp_path / "summary.json", folders, divergences, held_out, items,
                            types.SimpleNamespace(seeds=2), timer, baseline="FFT",
                            base_name="base", aligned=(1, 2), range_file=divergences["before"])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["aligned_layers"]["layers"] == [1, 2]
    assert (summary["shifcon_area"]["shift_layer"], summary["shifcon_area"]["shift_back_layer"]) \
        == (0, 2)
    fft, sara = summary["methods"]["FFT"], summary["methods"]["SARA"]
    assert fft["target_accuracy"] == {"mgsm": 50.0, "global_mmlu": 30.0}  # the seen item left out
    assert sara["target_accuracy"] == {"mgsm": 65.0, "global_mmlu": 50.0}
    assert (fft["anchor_retention"], sara["anchor_retention"]) == (1.0, 0.5)
    assert sara["divergence_ratio"] == pytest.approx(0.075 / 0.15)
    assert fft["divergence_ratio"] == pytest.approx(0.3 / 0.15)
    c = sara["tests_against_fft"]["mgsm"]
    assert c["difference"] == pytest.approx(15.0)
    expected = stats.ttest_rel([50, 80], [40, 60], alternative="greater")
    assert c["paired_t"]["p_one_tailed"] == pytest.approx(expected.pvalue)
    assert sara["minimum_detectable_effect"]["mgsm"] == pytest.approx(
        minimum_detectable_effect(stats.tstd([10, 20]), 2))
    assert c["mcnemar"]["items"] == 30  # the held-out target items, first seed
    arithmetic, lookups = summary["verdict"].splitlines()
    assert "ahead of FFT by 15.00 points, not significantly" in arithmetic
    assert "void" in lookups and "SARA's anchor retention 0.50" in lookups
    assert "FFT's" not in lookups  # FFT kept the anchor's facts
