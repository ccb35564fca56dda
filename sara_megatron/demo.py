"""The end-to-end CPU demo (`make demo`): the whole SARA pipeline on a tiny Qwen3-MoE.

A parallel corpus translated by rule over the OpenAI wire format, a local tokenizer and token
shards, a random tiny Qwen3-MoE imported from an HF folder, anchor priors, SARA and FFT training
on 2 gloo ranks with EP=2, the routing divergence before and after, the SARA checkpoint exported
and verified, and the report (README.md, "What the demo does and prints"). Every step runs the
tool (`sara_megatron.cli`) in a subprocess, as a user would, through `sara_megatron.tool_runner`;
the training runs read `DEMO_TRAIN_CONFIG`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sara_megatron.tool_errors import InputError
from sara_megatron.tool_runner import run_tool, tool_environment

ANCHOR, LEXICON_SWAP, REORDERED = "en", "hi", "sw"


# The tiny CPU run both trainings start from (examples/tiny_cpu_sara.yaml holds the same settings
# for a user to start from; a test checks that they agree): tiny Qwen3-MoE, 2 gloo ranks, EP=2.
# The demo fills in the paths, λ_JS and the steps with --set.
DEMO_TRAIN_CONFIG = {
    "model": {"preset": "qwen3_moe_tiny", "checkpoint": None},
    "parallel": {"tp": 1, "pp": 1, "ep": 2},
    "data": {"shards_dir": None, "prior_store": None, "languages": "targets", "seq_length": 64,
             "micro_batch_size": 4, "global_batch_size": 16},
    "sara": {"lambda_js": 1.5, "layers": "all"},
    "optim": {"lr": 1.0e-3, "train_steps": 40, "warmup_fraction": 0.05},
    "logging": {"log_interval": 5},
}


def write_yaml(path: Path, config: dict) -> Path:
    """Write `config` as YAML at `path` (its folder is made).

    Args:
        path: The file to write.
        config: The mapping to dump, in its own key order.

    Returns:
        `path`.
    """
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_demo_anchors(path: Path, num_samples: int) -> Path:
    """Write the demo's anchor-language corpus: `num_samples` synthetic records, one JSON per line.

    Args:
        path: The JSONL file to write (its folder is made).
        num_samples: The number of records.

    Returns:
        `path`.
    """
    from sara_megatron.data.synthetic_corpus import synthetic_record

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_samples):
            record = synthetic_record(f"demo-{i:05d}", ANCHOR, i, max_words=24)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def translate_demo_corpus(work: Path, anchors: Path) -> list[str]:
    """The targets through the real translation path.

    `translate_corpus` runs against the rule-based translator on 127.0.0.1, started and stopped
    here.

    Args:
        work: The demo's working folder (the corpus goes to <work>/corpus).
        anchors: The anchor-language JSONL file.

    Returns:
        The corpus files: anchor, lexicon swap, reordered.

    Raises:
        SystemExit: The tool failed, or a translation failed its checks.
    """
    from sara_megatron.construction.rule_translator import rule_translator_server

    with rule_translator_server() as translator:
        # No key is needed, and a user's real OPENAI_API_KEY is not sent even to localhost.
        _run("translate", "translate_corpus", [
            "--input", str(anchors), "--languages", f"{LEXICON_SWAP},{REORDERED}", "--output",
            "corpus", "--model", "rule-translator", "--base-url", translator.base_url,
            "--concurrency", "8"], work, unset_env=("OPENAI_API_KEY",))
    failures = (work / "corpus" / "translation_failures.jsonl").read_text().splitlines()
    if failures:
        raise SystemExit(f"[demo] {len(failures)} translation(s) failed the checks, e.g. "
                         f"{failures[0]}; log {work / 'logs' / 'translate.log'}")
    return [str(work / "corpus" / f"{lang}.jsonl") for lang in (ANCHOR, LEXICON_SWAP, REORDERED)]


def write_tiny_hf_model(out_dir: Path, tokenizer_dir: Path, seed: int = 1234) -> None:
    """A random Qwen3-MoE with the `qwen3_moe_tiny` shape, saved the way the hub ships models.

    Args:
        out_dir: The HF folder to write (safetensors, config, and the tokenizer's files).
        tokenizer_dir: The tokenizer folder whose files are copied beside the weights.
        seed: The torch seed of the random weights.
    """
    import torch
    import transformers

    from sara_megatron.models.architecture import get_preset

    arch = get_preset("qwen3_moe_tiny")
    config = transformers.Qwen3MoeConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        intermediate_size=4 * arch.hidden_size, moe_intermediate_size=arch.moe_ffn_hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups, head_dim=arch.kv_channels,
        num_experts=arch.num_experts, num_experts_per_tok=arch.moe_router_topk,
        rms_norm_eps=arch.norm_epsilon, rope_theta=arch.rotary_base, norm_topk_prob=True,
        max_position_embeddings=arch.max_position_embeddings, tie_word_embeddings=False,
        router_aux_loss_coef=arch.router_aux_loss_coef,
    )
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config)
    # Wider router weights than the 0.02 default: routing starts far from uniform, so there is
    # language-specific routing for SARA to align.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(tokenizer_dir / name, out_dir / name)


def _run(step: str, tool: str, args: list[str], cwd: Path, nproc: int = 0,
         unset_env: tuple = ()) -> None:
    """Run a tool (`tool_runner.run_tool`); with nproc, on that many ranks under torchrun. Its
    output goes to <work>/logs/<step>.log."""
    print(f"[demo] {step} ...", flush=True)
    run = run_tool(tool, args, cwd, cwd / "logs" / f"{step}.log", nproc,
                   tool_environment(unset=unset_env, threads="1"))
    if run.returncode != 0:
        raise SystemExit(f"[demo] {step} failed (exit {run.returncode}); log {run.log}:\n"
                         f"{run.tail()}")
    print(f"[demo] {step} done in {run.seconds:.0f}s (log: {run.log})", flush=True)


# A demo's work folder carries this file; only such a folder (or an empty one) is replaced.
DEMO_MARKER = ".sara_demo"


def _fresh_work_folder(work: Path) -> None:
    """Empty `work` for a new run, refusing a folder the demo did not make: `--work` pointed at
    real data by mistake must not be deleted.

    Raises:
        InputError: `work` is a file, or a folder of files the demo did not make.
    """
    if work.exists():
        if not work.is_dir():
            raise InputError(f"--work {work} is a file, not a folder")
        if any(work.iterdir()) and not (work / DEMO_MARKER).is_file():
            raise InputError(f"--work {work} holds files the demo did not make (no {DEMO_MARKER} "
                             "marker); give an empty or new folder")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / DEMO_MARKER).write_text("made by sara_megatron.demo; replaced by the next run\n")


def prepare_demo_inputs(work: Path, num_samples: int = 96) -> None:
    """The demo's first stages (1 to 4) in a new `work` folder: the parallel corpus, the
    tokenizer and token shards, the tiny HF model and its converted checkpoint, the anchor priors.

    Args:
        work: the demo's working folder: new, empty, or an earlier demo's (replaced).
        num_samples: parallel samples per language.

    Raises:
        SystemExit: a stage failed (the message names its log).
        InputError: `work` holds files the demo did not make.
    """
    from sara_megatron.data.local_tokenizer import build_local_tokenizer
    from sara_megatron.data.synthetic_corpus import corpus_texts

    _fresh_work_folder(work)
    print(f"[demo] corpus: {num_samples} samples in {ANCHOR} (anchor), translated by rule over the "
          f"OpenAI wire format into {LEXICON_SWAP} (lexicon swap) and {REORDERED} (lexicon swap + "
          "word order)", flush=True)
    anchors = write_demo_anchors(work / "anchors" / f"{ANCHOR}.jsonl", num_samples)
    paths = translate_demo_corpus(work, anchors)
    build_local_tokenizer(corpus_texts(paths), work / "tokenizer", vocab_size=200)
    _run("shard", "shard_corpus", ["--corpus", "corpus", "--tokenizer", "tokenizer", "--output",
                                   "shards", "--anchor-language", ANCHOR, "--seq-length", "64"],
         work)
    write_tiny_hf_model(work / "hf", work / "tokenizer")
    _run("convert", "convert_hf", ["import", "--hf-dir", "hf", "--out", "base"], work)
    _run("extract_priors", "extract_priors", ["--shards", "shards", "--checkpoint", "base",
                                              "--model", "hf", "--output", "priors", "--ep", "2"],
         work, nproc=2)


def run_demo(work: Path, num_samples: int = 96, train_steps: int = 40) -> dict:
    """The whole demo in `work`: `prepare_demo_inputs`, then the divergence of the base model,
    SARA and FFT training, their divergence, the export and its verification, and the report.

    Args:
        work: the demo's working folder: new, empty, or an earlier demo's (replaced).
        num_samples: parallel samples per language.
        train_steps: training steps of each run.

    Returns:
        The divergence results: {"before": ..., "sara": ..., "fft": ...}.

    Raises:
        SystemExit: a stage failed (the message names its log).
    """
    from sara_megatron.training.checkpoint import latest_checkpoint

    prepare_demo_inputs(work, num_samples)

    def divergence(step: str, checkpoint: str) -> dict:
        _run(step, "routing_divergence", [
            "--shards", "shards", "--checkpoint", checkpoint, "--model", "hf", "--json",
            f"{step}.json", "--expert-usage", f"{step}_usage.json"], work)
        return json.loads((work / f"{step}.json").read_text())

    before = divergence("divergence_base", "base")
    runs = {}
    config = write_yaml(work / "train.yaml", DEMO_TRAIN_CONFIG)
    for name, lam in (("sara", 1.5), ("fft", 0.0)):
        _run(f"train_{name}", "train", [
            "--config", str(config),
            "--set", "model.preset=hf", "--set", "model.checkpoint=base",
            "--set", "data.shards_dir=shards", "--set", "data.prior_store=priors",
            "--set", f"sara.lambda_js={lam}", "--set", f"optim.train_steps={train_steps}",
            "--set", f"checkpoint.save_dir={name}", "--set", f"logging.json_log={name}.jsonl",
        ], work, nproc=2)
        runs[name] = divergence(f"divergence_{name}", latest_checkpoint(work / name))
    # The pipeline's last step: the SARA checkpoint back to an HF folder, checked against
    # transformers' own model on it.
    sara_checkpoint = latest_checkpoint(work / "sara")
    _run("export_sara", "convert_hf",
         ["export", "--megatron-dir", sara_checkpoint, "--out", "sara_hf"], work)
    _run("verify_sara", "convert_hf",
         ["verify", "--hf-dir", "sara_hf", "--megatron-dir", sara_checkpoint], work)

    summarize_demo(work)
    return {"before": before, **runs}


# The divergence results the demo's steps write, under the names its table and report give them.
DEMO_DIVERGENCE = {"before": "divergence_base.json", "after SARA": "divergence_sara.json",
                   "after FFT": "divergence_fft.json"}


def summarize_demo(work: Path) -> Path:
    """Print the divergence table and both runs' CE / JS, then write the report.

    <work>/report/report.md (and its figures) is written from the same files.

    Args:
        work: The demo's working folder, after `run_demo`'s steps.

    Returns:
        The path of report.md.
    """
    from sara_megatron.analysis import format_divergence_table
    from sara_megatron.analysis.report import ReportInputs, write_report

    results = {name: json.loads((work / f).read_text()) for name, f in DEMO_DIVERGENCE.items()}
    table = format_divergence_table(results["before"]["layers"],
                                    {name: r["divergence"] for name, r in results.items()})
    print("\nper-layer routing divergence JS(anchor ‖ target), mean over samples "
          f"(anchor {ANCHOR}; {LEXICON_SWAP}: lexicon swap; {REORDERED}: swap + word order)")
    print(table)
    for name in ("sara", "fft"):
        lines = (work / f"{name}.jsonl").read_text().splitlines()
        first, last = json.loads(lines[0]), json.loads(lines[-1])
        print(f"{name}: step {first['step']} -> {last['step']}: CE {first['ce']:.3f} -> "
              f"{last['ce']:.3f}, training-batch JS {first['js']:.3e} -> {last['js']:.3e}")
    report = write_report(ReportInputs(
        title="SARA demo: tiny Qwen3-MoE, SARA vs FFT",
        divergence={name: str(work / f) for name, f in DEMO_DIVERGENCE.items()},
        training_logs={"SARA": str(work / "sara.jsonl"), "FFT": str(work / "fft.jsonl")},
        expert_usage=str(work / "divergence_base_usage.json"),
    ), work / "report")
    print(f"[demo] report: {report}", flush=True)
    return Path(report)
