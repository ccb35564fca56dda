"""The comparison (`make experiment`): from one base model, FFT and SARA (and the other objectives
that exist) fine-tuned on the same parallel corpus over several seeds, each evaluated on held-out
items in every language, then the report and a verdict written from its numbers.

Every stage is a user-facing tool in a subprocess (logs in <work>/logs/); the base model is cached
by content hash under <work>/base/, and every method's `sara.layers` is the range read off the
base's routing-divergence U-curve. The stages are listed in `run_experiment` and docs/experiment.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

from sara_megatron.analysis.divergence_results import read_divergence
from sara_megatron.experiment.base_model import BaseSettings, ensure_base_model
from sara_megatron.experiment.merge import merge_seed_evaluations
from sara_megatron.experiment.task import (
    ANCHOR, LANGUAGES, TaskSettings, fine_tune_people, held_out_people, item_keys, lookup_items,
    math_items)
from sara_megatron.experiment.task_files import (
    LOOKUP_BENCHMARK, MATH_BENCHMARK, parallel_corpus_records, write_benchmarks, write_corpus)
from sara_megatron.experiment.tool_runs import (
    StepTimer, latest_checkpoint, run_parallel, run_tool, write_train_config)
from sara_megatron.sara.layers import read_layer_range_file

# ShifCon's area is the one its own metric suggests on the base (the subspace distance of the
# language vectors, `tools/routing_divergence.py --language-vectors`), as SARA's range is the
# U-curve's: "SHIFT"/"SHIFT_BACK" are its ends.
SHIFCON = {"language_vectors": "VECTORS", "shift_layer": "SHIFT", "shift_back_layer": "SHIFT_BACK"}
# ShifCon as this project ran it before the authors' released settings became the defaults
# (docs/objectives.md): its contrast, raw token-mean language vectors, and evaluation without the
# shift. The "shifcon_earlier" arm, to compare the two on the same seeds.
SHIFCON_EARLIER = {"temperature": 0.05, "contrastive_coeff": 1.0, "ce_weight": 1.0,
                   "symmetric": False, "anchor_gradient": False, "contrast_layers": "shift_back",
                   "language_vectors": "TOKEN_MEAN_VECTORS"}
# Each method: its label in the report and the training settings that make it. "FIRST"/"LAST" are
# the ends of the alignment range read off the base's U-curve, "SEED" the run's training seed.
METHODS = {
    "fft": ("FFT", {"sara": {"lambda_js": 0.0}}),
    "sara": ("SARA", {"sara": {"lambda_js": "LAMBDA"}}),
    "sara_all": ("SARA-a", {"sara": {"lambda_js": "LAMBDA", "layers": "all"}}),
    "sara_random": ("SARA-r", {"sara": {"lambda_js": "LAMBDA", "layers": "random",
                                        "first_layer": "FIRST", "last_layer": "LAST",
                                        "layer_seed": "SEED"}}),
    "sara_online": ("SARA (online priors)", {"sara": {"lambda_js": "LAMBDA", "priors": "online"}}),
    "aes": ("AES", {"sara": {"lambda_js": 0.0, "objective": "aes"}}),
    "aes_authors": ("AES (released calibration)",
                    {"sara": {"lambda_js": 0.0, "objective": "aes"},
                     "aes": {"calibration": "authors"}}),
    "shifcon": ("ShifCon", {"sara": {"lambda_js": 0.0, "objective": "shifcon"},
                            "shifcon": SHIFCON}),
    "shifcon_earlier": ("ShifCon (earlier)",
                        {"sara": {"lambda_js": 0.0, "objective": "shifcon"},
                         "shifcon": {**SHIFCON, **SHIFCON_EARLIER}}),
}
# Methods whose models are evaluated and measured without their ShifCon shift.
UNSHIFTED_AT_EVALUATION = ("shifcon_earlier",)
# The paper's Table 2 ablations of the layer choice: run only when asked for (--methods), as are
# the baselines' variants (aes_authors, shifcon_earlier).
ABLATIONS = ("sara_all", "sara_random")
BASELINE_METHOD = "fft"
# The language vectors' files under <work>/data/, by the config placeholder that names each and
# the normalisation (tools/extract_language_vectors.py) that makes it.
LANGUAGE_VECTORS = {"VECTORS": ("language_vectors.safetensors", "sentence_l2"),
                    "TOKEN_MEAN_VECTORS": ("language_vectors_token_mean.safetensors", "token_mean")}
BASE_DIVERGENCE = "divergence/base.json"
# A work folder carries this file; only such a folder (or an empty one) is cleared.
MARKER = ".sara_experiment"


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    """The comparison's settings (the base model's are `base`)."""
    base: BaseSettings = BaseSettings()
    eval_math_items: int = 100  # held-out arithmetic items per language
    finetune_math_items: int = 300
    finetune_lookup_copies: int = 10  # of each fact question about the fine-tuning people
    finetune_steps: int = 60
    finetune_batch_size: int = 16  # samples per step (every language, the anchor included)
    # A twentieth of the base's peak lr, the anchor's copies in the mix: fine-tuning adapts the
    # targets without erasing what the base knows in the anchor (the paper fine-tunes a
    # pretrained model at 2e-5).
    finetune_lr: float = 2e-4
    finetune_languages: str = "all"  # "all": the anchor's samples train too; "targets": not
    lambda_js: float = 1.5
    seeds: int = 5
    methods: tuple = ("fft", "sara", "aes")
    max_new_tokens: int = 24  # the longest worked answer is 22 tokens, then the end token
    eval_batch_size: int = 16  # items generated together (the replies do not depend on it)
    jobs: int = 2  # fine-tuning runs at once (each one process)


def prepare_work_folder(work: Path) -> None:
    """Clear an earlier experiment's results, keeping the base model cache (<work>/base/), and
    mark the folder as the experiment's.

    Args:
        work: The work folder (created if missing).

    Raises:
        ValueError: `work` is not empty and lacks the experiment's marker file.
    """
    if work.exists():
        if any(work.iterdir()) and not (work / MARKER).is_file():
            raise ValueError(f"{work} holds files the experiment did not make (no {MARKER} "
                             "marker); give an empty or new folder")
        for child in work.iterdir():
            if child.name != "base":
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by sara_megatron.experiment; replaced by the next run "
                               "(base/ is a cache)\n")


def finetune_config(work: Path, settings: ExperimentSettings, base, method: str, seed: int,
                    run_dir: Path, aligned: tuple[int, int],
                    shift_area: tuple[int, int] | None = None) -> dict:
    """tools/train.py's config of one fine-tuning run; `aligned` is the (first, last) alignment
    range of the base's divergence file, which the method reads as `sara.layers: <file>`.

    Args:
        work: The experiment's work folder (data, shards, priors, the base's divergence).
        settings: The comparison's settings.
        base: The base model (`BaseModel`) the run starts from.
        method: A key of `METHODS`.
        seed: The run's seed number (1-based; the training seed is 1000 + seed).
        run_dir: The run's folder (checkpoints, train.jsonl).
        aligned: The (first, last) alignment layer range.
        shift_area: ShifCon's (shift_layer, shift_back_layer) from the base's divergence file;
            needed by the ShifCon methods only.

    Returns:
        The config as a dict (model, parallel, data, sara, optim, checkpoint, logging, seed).

    Raises:
        ValueError: a ShifCon method without `shift_area`.
    """
    replacements = {'"LAMBDA"': repr(settings.lambda_js),
                    **{f'"{key}"': json.dumps(str(work / "data" / name))
                       for key, (name, _) in LANGUAGE_VECTORS.items()},
                    '"FIRST"': str(aligned[0]), '"LAST"': str(aligned[1]),
                    '"SEED"': str(1000 + seed)}
    text = json.dumps(METHODS[method][1])
    if '"SHIFT"' in text:
        if shift_area is None:
            raise ValueError(f"{method} needs ShifCon's area from the base's divergence")
        replacements.update({'"SHIFT"': str(shift_area[0]), '"SHIFT_BACK"': str(shift_area[1])})
    for key, value in replacements.items():
        text = text.replace(key, value)
    overrides = json.loads(text)
    sara = {"lambda_js": 0.0, "layers": str(work / BASE_DIVERGENCE), **overrides["sara"]}
    uses_store = sara["lambda_js"] > 0 and sara.get("priors", "store") == "store"
    return {
        "model": {"preset": str(base.folder / "hf_init"), "checkpoint": str(base.checkpoint)},
        "parallel": {"tp": 1, "pp": 1, "ep": 1},
        "data": {"shards_dir": str(work / "data" / "shards"),
                 "prior_store": str(work / "data" / "priors") if uses_store else None,
                 "languages": settings.finetune_languages,
                 "seq_length": settings.base.seq_length,
                 "micro_batch_size": settings.finetune_batch_size,
                 "global_batch_size": settings.finetune_batch_size},
        "sara": sara,
        "optim": {"lr": settings.finetune_lr, "min_lr": settings.finetune_lr / 10,
                  "train_steps": settings.finetune_steps, "warmup_fraction": 0.1},
        **{section: values for section, values in overrides.items() if section != "sara"},
        "checkpoint": {"save_dir": str(run_dir / "checkpoints")},
        "logging": {"log_interval": 1, "json_log": str(run_dir / "train.jsonl")},
        "seed": 1000 + seed,
    }


def evaluate(step: str, model_dir: Path, output: Path, work: Path, settings: ExperimentSettings,
             timer: StepTimer, unshifted: bool = False) -> None:
    """Evaluate an HF model on both benchmarks in every language (`tools/evaluate.py`, one run).

    Args:
        step: The stage's name.
        model_dir: The HF model folder.
        output: The evaluation's output folder.
        work: The work folder the tool runs in (holds data/benchmarks).
        settings: The comparison's settings (`max_new_tokens`).
        timer: Records the stage's time.
        unshifted: Evaluate a ShifCon export without its shift (`--no-shift`).
    """
    run_tool(step, "evaluate.py", [
        "--benchmarks", f"{MATH_BENCHMARK},{LOOKUP_BENCHMARK}", "--languages", ",".join(LANGUAGES),
        "--backend", "hf", "--model-dir", str(model_dir), "--data-dir", "data/benchmarks",
        "--runs", "1", "--seed", "0", "--max-new-tokens", str(settings.max_new_tokens),
        "--batch-size", str(settings.eval_batch_size), "--no-progress", "--output", str(output),
        *(["--no-shift"] if unshifted else [])], work, timer)


def finetune_and_evaluate(work: Path, settings: ExperimentSettings, base, method: str, seed: int,
                          aligned: tuple[int, int], shift_area: tuple[int, int] | None,
                          timer: StepTimer) -> Path:
    """Fine-tune the base with one method and seed, export it to HF and evaluate it.

    Args:
        work: The experiment's work folder.
        settings: The comparison's settings.
        base: The base model (`BaseModel`).
        method: A key of `METHODS`.
        seed: The seed number (1-based).
        aligned: The (first, last) alignment layer range.
        shift_area: ShifCon's (shift_layer, shift_back_layer), or None.
        timer: Records each stage's time.

    Returns:
        The run's folder, `<work>/runs/<method>-s<seed>/` (hf/, eval/, train.jsonl).
    """
    run_dir = work / "runs" / f"{method}-s{seed}"
    config = write_train_config(run_dir / "train.yaml", finetune_config(
        work, settings, base, method, seed, run_dir, aligned, shift_area))
    run_tool(f"train:{method}-s{seed}", "train.py", ["--config", str(config)], work, timer)
    run_tool(f"export:{method}-s{seed}", "convert_hf.py",
             ["export", "--megatron-dir", str(latest_checkpoint(run_dir / "checkpoints")),
              "--out", str(run_dir / "hf")], work, timer)
    evaluate(f"evaluate:{method}-s{seed}", run_dir / "hf", run_dir / "eval", work, settings, timer,
             unshifted=method in UNSHIFTED_AT_EVALUATION)
    return run_dir


def divergence(step: str, checkpoint: Path, work: Path, timer: StepTimer,
               unshifted: bool = False, language_vectors: str | None = None) -> Path:
    """Measure a model's routing divergence on the fine-tuning shards
    (`tools/routing_divergence.py`).

    Args:
        step: The stage's name (also the output file's).
        checkpoint: The model (an HF folder or a checkpoint).
        work: The work folder (holds data/shards).
        timer: Records the stage's time.
        unshifted: Measure a ShifCon model without its shift (`--no-shift`).
        language_vectors: The base's sentence_l2 language vectors over every layer: also
            suggest ShifCon's area (`shift_area` in the JSON).

    Returns:
        The divergence JSON file, `<work>/divergence/<step>.json`.
    """
    out = work / "divergence" / f"{step}.json"
    out.parent.mkdir(exist_ok=True)
    run_tool(f"divergence:{step}", "routing_divergence.py",
             ["--shards", "data/shards", "--checkpoint", str(checkpoint), "--json", str(out),
              *(["--no-shift"] if unshifted else []),
              *(["--language-vectors", language_vectors] if language_vectors else [])],
             work, timer)
    return out


def held_out_items(settings: ExperimentSettings):
    """(arithmetic, lookups about the held-out people, lookups about the fine-tuning people): the
    evaluation's items. Only the fine-tuning people's lookups are seen in fine-tuning.

    Args:
        settings: The comparison's settings.
    """
    task = settings.base.task
    return (math_items(task, settings.eval_math_items, "eval"),
            lookup_items(task, "eval", people=held_out_people(task)),
            lookup_items(task, "eval", people=fine_tune_people(task)))


def run_experiment(work: Path, settings: ExperimentSettings) -> Path:
    """Run the whole comparison: held-out items, the base model, the fine-tuning corpus and its
    shards, the base's divergence, priors and evaluation, every method's runs over the seeds,
    then the merged evaluations, the report, summary.json and the verdict.

    Args:
        work: The work folder (an earlier experiment's results in it are replaced).
        settings: The comparison's settings.

    Returns:
        The path of report.md (summary.json beside it).

    Raises:
        ValueError: unknown methods, or no FFT baseline among them; a work folder the experiment
            did not make.
        StepFailed: a tool exited non-zero.
    """
    from sara_megatron.experiment.summary import write_summary
    from sara_megatron.experiment.verdict import append_verdict

    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown or BASELINE_METHOD not in settings.methods:
        raise ValueError(f"methods must include {BASELINE_METHOD} and be among "
                         f"{', '.join(METHODS)}; got {', '.join(settings.methods)}")
    started = time.time()
    work = work.resolve()  # the tools run inside it: every path handed to them is absolute
    prepare_work_folder(work)
    timer = StepTimer()

    # 1. The evaluation's items: held-out arithmetic, lookups about the held-out people (the
    # transfer set) and, after them, the fine-tuning people's (seen in fine-tuning).
    task = settings.base.task
    eval_math, eval_held_out_lookups, eval_seen_lookups = held_out_items(settings)
    write_benchmarks(work / "data" / "benchmarks", eval_math,
                     eval_held_out_lookups + eval_seen_lookups)
    held_out_ids = {MATH_BENCHMARK: {str(i) for i in range(len(eval_math))},
                    LOOKUP_BENCHMARK: {i.item_id for i in eval_held_out_lookups}}

    # 2. The base model.
    t0 = time.time()
    base = ensure_base_model(work, settings.base, eval_math + eval_held_out_lookups, timer,
                             settings.jobs)
    timer.add("base model (total)", time.time() - t0)

    # 3. The fine-tuning corpus and its shards; then the anchor priors, the base's routing
    # divergence (its U-curve gives the alignment range) and the base's evaluation, `jobs` at a
    # time (most stages use one core).
    finetune_items = (
        math_items(task, settings.finetune_math_items, "finetune", item_keys(eval_math))
        + lookup_items(task, "finetune", settings.finetune_lookup_copies, fine_tune_people(task)))
    write_corpus(work / "data" / "finetune", parallel_corpus_records(finetune_items))
    run_tool("shard", "shard_corpus.py",
             ["--corpus", "data/finetune", "--tokenizer", str(base.tokenizer_dir), "--output",
              "data/shards", "--anchor-language", ANCHOR, "--seq-length",
              str(settings.base.seq_length)], work, timer)

    # The language vectors (over every layer) come first when a ShifCon method runs: the base's
    # divergence reads them to suggest ShifCon's area.
    wanted = json.dumps([METHODS[method][1] for method in settings.methods])
    needs_area = '"SHIFT"' in wanted  # the area comes from the sentence_l2 vectors, always
    vectors = {key: value for key, value in LANGUAGE_VECTORS.items()
               if f'"{key}"' in wanted or (needs_area and key == "VECTORS")}

    def divergence_of_base():
        for name, normalisation in vectors.values():
            run_tool(f"extract_language_vectors:{normalisation}", "extract_language_vectors.py",
                     ["--shards", "data/shards", "--checkpoint", str(base.checkpoint),
                      "--model", str(base.folder / "hf_init"), "--output", f"data/{name}",
                      "--layers", f"0-{settings.base.shape.num_layers - 1}",
                      "--normalisation", normalisation], work, timer)
        divergence("base", base.hf_dir, work, timer,
                   language_vectors=(f"data/{LANGUAGE_VECTORS['VECTORS'][0]}"
                                     if needs_area else None))

    run_parallel([divergence_of_base,
                  lambda: run_tool("extract_priors", "extract_priors.py",
                                   ["--shards", "data/shards", "--checkpoint",
                                    str(base.checkpoint), "--model", str(base.folder / "hf_init"),
                                    "--output", "data/priors"], work, timer),
                  lambda: evaluate("evaluate:base", base.hf_dir, work / "eval" / "base", work,
                                   settings, timer)], settings.jobs)
    aligned = read_layer_range_file(str(work / BASE_DIVERGENCE))
    print(f"[experiment] alignment range from the base's U-curve: layers "
          f"{aligned[0]}..{aligned[1]}", flush=True)
    shift_area = None
    if needs_area:
        area = read_divergence(work / BASE_DIVERGENCE).shift_area
        shift_area = (area["shift_layer"], area["shift_back_layer"])
        print(f"[experiment] ShifCon's area from the base's subspace distance: shift entering "
              f"layer {shift_area[0]}, back entering layer {shift_area[1]}", flush=True)

    # 4. Every fine-tuning run (`jobs` at a time), each method's first seed followed by its
    # routing divergence.
    def finetune_job(method: str, seed: int):
        run_dir = finetune_and_evaluate(work, settings, base, method, seed, aligned,
                                        shift_area, timer)
        if seed == 1:
            return METHODS[method][0], divergence(method, run_dir / "hf", work, timer,
                                                  unshifted=method in UNSHIFTED_AT_EVALUATION)
        return None

    jobs = [(lambda m=m, s=s: finetune_job(m, s))
            for s in range(1, settings.seeds + 1) for m in settings.methods]
    finished = dict(result for result in run_parallel(jobs, settings.jobs) if result is not None)

    # 5. Routing divergence: the base, then each method's first seed (the report's order).
    divergences = {"before": work / BASE_DIVERGENCE}
    divergences.update({METHODS[m][0]: finished[METHODS[m][0]] for m in settings.methods})

    # 6. Merge seeds, write the report, the summary and the verdict (read from the summary).
    evaluations = {"base": work / "eval" / "base"}
    for method in settings.methods:
        folder = work / "eval" / method
        merge_seed_evaluations([work / "runs" / f"{method}-s{s}" / "eval"
                                for s in range(1, settings.seeds + 1)], folder)
        evaluations[METHODS[method][0]] = folder
    report_args = ["--out", str(work), "--title",
                   "SARA vs FFT at small scale: a tiny Qwen3-MoE on a rule-translated task"]
    for name, path in divergences.items():
        report_args += ["--divergence", f"{name}={path}"]
    for method in settings.methods:
        report_args += ["--run", f"{METHODS[method][0]}={work / 'runs' / f'{method}-s1' / 'train.jsonl'}"]
    for name, folder in evaluations.items():
        report_args += ["--eval", f"{name}={folder}"]
    report_args += ["--baseline", METHODS[BASELINE_METHOD][0]]
    run_tool("report", "report.py", report_args, work, timer)
    timer.add("total", time.time() - started)
    items = {MATH_BENCHMARK: {"held_out": len(eval_math), "seen_in_finetuning": 0},
             LOOKUP_BENCHMARK: {"held_out": len(eval_held_out_lookups),
                                "seen_in_finetuning": len(eval_seen_lookups)}}
    summary = write_summary(
        work / "summary.json", evaluations, divergences, held_out_ids, items, settings, timer,
        baseline=METHODS[BASELINE_METHOD][0], base_name="base", aligned=aligned,
        range_file=work / BASE_DIVERGENCE)
    report = work / "report.md"
    append_verdict(report, summary, evaluations["base"], settings, base=base,
                   machine=machine_description(), cpu_seconds=timer.cpu_seconds)
    return report


def machine_description() -> str:
    """A one-line description of this machine: architecture, OS, visible cores, load average."""
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores visible, "
            f"load average at the end {load}")


def reduced_settings() -> ExperimentSettings:
    """The test suite's version: a small world, two seeds, FFT and SARA, a short base training,
    few items (about the same path as the full run, minutes on two cores)."""
    # Operands 1..4 and 4 people (12 facts, 6 of them held out): what a 4-layer base learns in
    # 300 steps. With 8 people (24 facts) 200 steps left the base at chance on anchor lookups.
    base = dataclasses.replace(
        BaseSettings(), task=TaskSettings(max_operand=4, people=4, fine_tune_people=2),
        shape=dataclasses.replace(BaseSettings().shape, num_layers=4),
        math_items=800, lookup_copies=30, fact_copies=4, text_items=40, train_steps=300)
    return ExperimentSettings(base=base, eval_math_items=12, finetune_math_items=48,
                              finetune_lookup_copies=4, finetune_steps=8, finetune_lr=1e-3,
                              seeds=2, methods=("fft", "sara"), jobs=2)


def quick_settings() -> ExperimentSettings:
    """`--quick`: the full run's base model (the same cache key) and items, FFT and SARA only,
    over three seeds instead of five; a first look, not the powered comparison.

    Returns:
        The `ExperimentSettings` of a quick run.
    """
    return dataclasses.replace(ExperimentSettings(), seeds=3, methods=("fft", "sara"))
