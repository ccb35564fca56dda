"""Step time of each training objective against FFT on the tiny CPU config (benchmark, not a test).

    python benchmarks/bench_objectives.py --work out/bench_objectives [--nproc 1] [--steps 6]

Prepares, once, in --work: a synthetic parallel corpus (en anchor, hi and sw targets), a local
tokenizer, token shards, a random tiny Qwen3-MoE checkpoint, its anchor prior store and ShifCon's
language vectors (the project's own tools). Then, under torchrun, each variant trains a fresh
Trainer on the same data and weights (tiny_cpu_sara.yaml settings: micro-batch 4, global batch
16, sequences of 64, all 4 layers aligned). The variants run in turn, --rounds times (a fresh
Trainer each time), and each variant's time is the lowest over the rounds of its median step
after one warm-up step — on a shared machine the lowest is the least disturbed by other load. It
is printed beside its ratio to FFT:

    fft                 λ_JS = 0 with the prior store (the SARA code path, nothing added)
    sara                λ_JS 1.5, offline priors (the store)
    sara_kl, sara_jsen  the divergence variants (PyTorch reference path)
    sara_online         online priors: the anchor forward of every micro-batch in the step
    sara_half           offline priors, layers 0..1 of 4 aligned
    sara_online_half    online priors, layers 0..1 of 4 aligned (the anchor forward stops after
                        layer 1)
    aes                 AES (variance + orthogonality, self-calibrated)
    shifcon             ShifCon (shift 1 → 3, InfoNCE against the anchors' forward)

--json FILE writes the rows. Numbers depend on the machine and its load; say which with them.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "fft": ["sara.lambda_js=0"],
    "sara": [],
    "sara_kl": ["sara.divergence=kl"],
    "sara_jsen": ["sara.divergence=js_entropy_normalised"],
    "sara_online": ["sara.priors=online", "data.prior_store=null"],
    "sara_half": ["sara.layers=range", "sara.first_layer=0", "sara.last_layer=1"],
    "sara_online_half": ["sara.priors=online", "data.prior_store=null", "sara.layers=range",
                         "sara.first_layer=0", "sara.last_layer=1"],
    "aes": ["sara.objective=aes", "data.prior_store=null"],
    "shifcon": ["sara.objective=shifcon", "data.prior_store=null",
                "shifcon.language_vectors={work}/language_vectors.safetensors",
                "shifcon.shift_layer=1", "shifcon.shift_back_layer=3"],
}

_INIT = """
import sys
from sara_megatron.checkpointing import save_model_weights
from sara_megatron.distributed import ParallelConfig, destroy_distributed, initialize_distributed
from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model
if __name__ == "__main__":
    initialize_distributed(ParallelConfig(), seed=7)
    save_model_weights(build_model(get_preset("qwen3_moe_tiny")), sys.argv[1])
    destroy_distributed()
"""


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_objectives: {' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")


def _torchrun(nproc: int):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]


def prepare(work: Path) -> None:
    from sara_megatron.data.local_tokenizer import build_local_tokenizer
    from sara_megatron.data.synthetic_corpus import corpus_texts, write_synthetic_corpus

    if (work / "language_vectors.safetensors").exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    print("bench_objectives: preparing data, checkpoint, priors and language vectors", flush=True)
    paths = write_synthetic_corpus(work / "corpus", 128, languages=("en", "hi", "sw"), max_words=24)
    build_local_tokenizer(corpus_texts(paths), work / "tokenizer", vocab_size=200)
    _run([sys.executable, REPO / "tools/shard_corpus.py", "--corpus", work / "corpus",
          "--tokenizer", work / "tokenizer", "--output", work / "shards",
          "--anchor-language", "en", "--seq-length", "64"], work)
    (work / "init_checkpoint.py").write_text(_INIT)
    _run([sys.executable, work / "init_checkpoint.py", work / "init"], work)
    _run([*_torchrun(1), REPO / "tools/extract_priors.py", "--shards", work / "shards",
          "--checkpoint", work / "init", "--model", "qwen3_moe_tiny", "--output",
          work / "priors"], work)
    _run([*_torchrun(1), REPO / "tools/extract_language_vectors.py", "--shards", work / "shards",
          "--checkpoint", work / "init", "--model", "qwen3_moe_tiny", "--layers", "1,3",
          "--output", work / "language_vectors.safetensors"], work)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from sara_megatron.distributed import destroy_distributed
    from sara_megatron.training import Trainer, load_train_config

    work = Path(args.work).resolve()
    base = [f"model.checkpoint={work / 'init'}", f"data.shards_dir={work / 'shards'}",
            f"data.prior_store={work / 'priors'}", f"parallel.ep={args.ep}",
            f"optim.train_steps={args.steps + 1}", "checkpoint.save_dir=null"]
    best = {}
    for _ in range(args.rounds):
        for name in args.variants.split(","):
            overrides = [o.format(work=work) for o in VARIANTS[name]]
            trainer = Trainer(load_train_config(str(REPO / "examples/tiny_cpu_sara.yaml"),
                                                base + overrides))
            records = [trainer.train_step() for _ in range(args.steps + 1)][1:]
            step = torch.tensor(sorted(r.step_time_s for r in records)[len(records) // 2],
                                dtype=torch.float64)
            dist.all_reduce(step, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            if name not in best or float(step) < best[name]["step_s"]:
                best[name] = {"variant": name, "step_s": float(step),
                              "terms": {k: round(v, 6) for k, v in records[-1].terms.items()},
                              "js": records[-1].js}
            del trainer
    rows = [best[name] for name in args.variants.split(",")]
    if dist.get_rank() == 0:
        fft = next((r["step_s"] for r in rows if r["variant"] == "fft"), None)
        print(f"{'variant':<12} {'step s':>8} {'vs fft':>7}")
        for r in rows:
            ratio = r["step_s"] / fft if fft else float("nan")
            r["vs_fft"] = ratio
            print(f"{r['variant']:<12} {r['step_s']:>8.3f} {ratio:>7.2f}")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"world_size": dist.get_world_size(), "ep": args.ep,
                           "steps": args.steps, "rounds": args.rounds, "rows": rows}, f,
                          indent=1)
    destroy_distributed()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="out/bench_objectives")
    p.add_argument("--nproc", type=int, default=1, help="gloo ranks (EP = nproc)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 1 warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="each variant's time: the lowest median")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants {unknown}: choose from {', '.join(VARIANTS)}")
    if args.worker:
        return worker(args)
    work = Path(args.work).resolve()
    prepare(work)
    cmd = [*_torchrun(args.nproc), __file__, "--worker", "--work", str(work), "--ep",
           str(args.nproc), "--steps", str(args.steps), "--rounds", str(args.rounds),
           "--variants", args.variants]
    if args.json:
        cmd += ["--json", os.path.abspath(args.json)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
