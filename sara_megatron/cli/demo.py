"""The CPU demo of the whole SARA pipeline on a tiny Qwen3-MoE (what `make demo` runs).

    python tools/demo.py [--work out/demo] [--samples 96] [--steps 40]

Makes a rule-derived parallel corpus, shards it, converts a random tiny HF Qwen3-MoE, extracts
anchor priors on 2 gloo ranks with EP=2, fine-tunes with SARA and with FFT (λ_JS = 0) the same way,
and prints the per-layer routing divergence between anchor and targets before and after both.
"""

import argparse
import sys
from pathlib import Path

from sara_megatron.demo import run_demo
from sara_megatron.tool_errors import report_user_error


def main(argv=None) -> int:
    """The `demo` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="out/demo", help="working folder: new, empty, or an earlier demo's (replaced)")
    p.add_argument("--samples", type=int, default=96, help="parallel samples per language")
    p.add_argument("--steps", type=int, default=40, help="training steps of each run")
    args = p.parse_args(argv)
    try:
        run_demo(Path(args.work).resolve(), args.samples, args.steps)
    except Exception as e:  # noqa: BLE001 - a --work folder of other files is one line
        return report_user_error(p.prog, e, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
