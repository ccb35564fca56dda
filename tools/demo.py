"""The CPU demo of the whole SARA pipeline on a tiny Qwen3-MoE (what `make demo` runs).

    python tools/demo.py [--work out/demo] [--samples 96] [--steps 40]

Makes a rule-derived parallel corpus, shards it, converts a random tiny HF Qwen3-MoE, extracts
anchor priors on 2 gloo ranks with EP=2, fine-tunes with SARA and with FFT (λ_JS = 0) the same way,
and prints the per-layer routing divergence between anchor and targets before and after both.
"""

import argparse
from pathlib import Path

from sara_megatron.demo import run_demo


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="out/demo", help="working folder: new, empty, or an earlier demo's (replaced)")
    p.add_argument("--samples", type=int, default=96, help="parallel samples per language")
    p.add_argument("--steps", type=int, default=40, help="training steps of each run")
    args = p.parse_args()
    run_demo(Path(args.work).resolve(), args.samples, args.steps)


if __name__ == "__main__":
    main()
