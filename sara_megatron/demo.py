"""The end-to-end CPU demo (`make demo`): the whole SARA pipeline on a tiny Qwen3-MoE.

1. A parallel corpus: anchor `en` made deterministically here, and two targets made from it by
   tools/translate_corpus.py against a rule-based translator speaking the OpenAI wire format on
   127.0.0.1 (`construction/rule_translator.py`), so the real client, cache and checks run:
   `hi` (a lexicon swap, in Devanagari) and `sw` (a lexicon swap and a word-order change). Every
   translation is exact by construction.
2. A local BPE tokenizer, then token shards (tools/shard_corpus.py).
3. A random tiny Qwen3-MoE written as a Hugging Face checkpoint and converted
   (tools/convert_hf.py import).
4. Anchor priors extracted on 2 gloo ranks with EP=2 (tools/extract_priors.py).
5. SARA fine-tuning and the FFT baseline (λ_JS = 0), each on 2 gloo ranks with EP=2 (tools/train.py).
6. Per-layer routing divergence JS(anchor ‖ target) before, after SARA and after FFT.
7. The SARA checkpoint exported to an HF folder and verified against transformers' model on it
   (tools/convert_hf.py export, verify).
8. The report: report/report.md with the divergence table and figures, the suggested alignment
   range, the base model's expert usage and both runs' training dynamics
   (sara_megatron.analysis.report).
Every step runs the user-facing tool in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sara_megatron.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
ANCHOR, LEXICON_SWAP, REORDERED = "en", "hi", "sw"


def write_demo_anchors(path: Path, num_samples: int) -> Path:
    from sara_megatron.data.synthetic_corpus import synthetic_record

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_samples):
            record = synthetic_record(f"demo-{i:05d}", ANCHOR, i, max_words=24)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def translate_demo_corpus(work: Path, anchors: Path) -> list[str]:
    """The targets through the real translation path: tools/translate_corpus.py against the
    rule-based translator on 127.0.0.1, started and stopped here. Returns the corpus files."""
    from sara_megatron.construction.rule_translator import rule_translator_server

    with rule_translator_server() as translator:
        # No key is needed, and a user's real OPENAI_API_KEY is not sent even to localhost.
        _run("translate", [str(REPO / "tools" / "translate_corpus.py"), "--input", str(anchors),
                           "--languages", f"{LEXICON_SWAP},{REORDERED}", "--output", "corpus",
                           "--model", "rule-translator", "--base-url", translator.base_url,
                           "--concurrency", "8"], work, unset_env=("OPENAI_API_KEY",))
    failures = (work / "corpus" / "translation_failures.jsonl").read_text().splitlines()
    if failures:
        raise SystemExit(f"[demo] {len(failures)} translation(s) failed the checks, e.g. "
                         f"{failures[0]}; log {work / 'logs' / 'translate.log'}")
    return [str(work / "corpus" / f"{lang}.jsonl") for lang in (ANCHOR, LEXICON_SWAP, REORDERED)]


def write_tiny_hf_model(out_dir: Path, tokenizer_dir: Path, seed: int = 1234) -> None:
    """A random Qwen3-MoE with the `qwen3_moe_tiny` shape, saved the way the hub ships models."""
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


def _run(step: str, args: list[str], cwd: Path, nproc: int = 0, unset_env: tuple = ()) -> None:
    """Run a tool; with nproc, under torchrun. Its output goes to <work>/logs/<step>.log."""
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(free_port())]
    cmd += args
    log = cwd / "logs" / f"{step}.log"
    log.parent.mkdir(exist_ok=True)
    started = time.time()
    print(f"[demo] {step} ...", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in unset_env:
        env.pop(name, None)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"[demo] {step} failed (exit {proc.returncode}); log {log}:\n{tail}")
    print(f"[demo] {step} done in {time.time() - started:.0f}s (log: {log})", flush=True)


def _latest(save_dir: Path) -> Path:
    from sara_megatron.training.checkpoint import iteration_dir, latest_iteration

    return Path(iteration_dir(str(save_dir), latest_iteration(str(save_dir))))


# A demo's work folder carries this file; only such a folder (or an empty one) is replaced.
DEMO_MARKER = ".sara_demo"


def _fresh_work_folder(work: Path) -> None:
    """Empty `work` for a new run, refusing a folder the demo did not make: `--work` pointed at
    real data by mistake must not be deleted."""
    if work.exists():
        if not work.is_dir():
            raise SystemExit(f"[demo] {work} is a file, not a folder")
        if any(work.iterdir()) and not (work / DEMO_MARKER).is_file():
            raise SystemExit(f"[demo] {work} holds files the demo did not make (no {DEMO_MARKER} "
                             "marker); give an empty or new folder")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / DEMO_MARKER).write_text("made by sara_megatron.demo; replaced by the next run\n")


def run_demo(work: Path, num_samples: int = 96, train_steps: int = 40) -> dict:
    from sara_megatron.data.local_tokenizer import build_local_tokenizer
    from sara_megatron.data.synthetic_corpus import corpus_texts

    _fresh_work_folder(work)
    tools = REPO / "tools"
    print(f"[demo] corpus: {num_samples} samples in {ANCHOR} (anchor), translated by rule over the "
          f"OpenAI wire format into {LEXICON_SWAP} (lexicon swap) and {REORDERED} (lexicon swap + "
          "word order)", flush=True)
    anchors = write_demo_anchors(work / "anchors" / f"{ANCHOR}.jsonl", num_samples)
    paths = translate_demo_corpus(work, anchors)
    build_local_tokenizer(corpus_texts(paths), work / "tokenizer", vocab_size=200)
    _run("shard", [str(tools / "shard_corpus.py"), "--corpus", "corpus", "--tokenizer",
                   "tokenizer", "--output", "shards", "--anchor-language", ANCHOR,
                   "--seq-length", "64"], work)
    write_tiny_hf_model(work / "hf", work / "tokenizer")
    _run("convert", [str(tools / "convert_hf.py"), "import", "--hf-dir", "hf", "--out", "base"],
         work)
    _run("extract_priors", [str(tools / "extract_priors.py"), "--shards", "shards",
                            "--checkpoint", "base", "--model", "hf", "--output", "priors",
                            "--ep", "2"], work, nproc=2)

    def divergence(step: str, checkpoint: str) -> dict:
        _run(step, [str(tools / "routing_divergence.py"), "--shards", "shards", "--checkpoint",
                    checkpoint, "--model", "hf", "--json", f"{step}.json", "--expert-usage",
                    f"{step}_usage.json"], work)
        return json.loads((work / f"{step}.json").read_text())

    before = divergence("divergence_base", "base")
    runs = {}
    for name, lam in (("sara", 1.5), ("fft", 0.0)):
        _run(f"train_{name}", [
            str(tools / "train.py"), "--config", str(REPO / "examples/tiny_cpu_sara.yaml"),
            "--set", "model.preset=hf", "--set", "model.checkpoint=base",
            "--set", "data.shards_dir=shards", "--set", "data.prior_store=priors",
            "--set", f"sara.lambda_js={lam}", "--set", f"optim.train_steps={train_steps}",
            "--set", f"checkpoint.save_dir={name}", "--set", f"logging.json_log={name}.jsonl",
        ], work, nproc=2)
        runs[name] = divergence(f"divergence_{name}", str(_latest(work / name)))
    # The pipeline's last step: the SARA checkpoint back to an HF folder, checked against
    # transformers' own model on it.
    sara_checkpoint = str(_latest(work / "sara"))
    _run("export_sara", [str(tools / "convert_hf.py"), "export", "--megatron-dir",
                         sara_checkpoint, "--out", "sara_hf"], work)
    _run("verify_sara", [str(tools / "convert_hf.py"), "verify", "--hf-dir", "sara_hf",
                         "--megatron-dir", sara_checkpoint], work)

    summarize_demo(work)
    return {"before": before, **runs}


# The divergence results the demo's steps write, under the names its table and report give them.
DEMO_DIVERGENCE = {"before": "divergence_base.json", "after SARA": "divergence_sara.json",
                   "after FFT": "divergence_fft.json"}


def summarize_demo(work: Path) -> Path:
    """Print the divergence table and both runs' CE / JS, then write <work>/report/report.md (and
    its figures) from the same files."""
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
