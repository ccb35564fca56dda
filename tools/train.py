"""SARA fine-tuning (torchrun / srun). One YAML per run, `--set section.key=value` overrides.

    torchrun --nproc-per-node 8 tools/train.py --config examples/qwen3_30b_a3b_sara.yaml \
        --set data.shards_dir=data/shards --set data.prior_store=data/priors

λ_JS = 0 (`--set sara.lambda_js=0`) is the full fine-tuning baseline on the same code path.
"""

import argparse
import logging

from sara_megatron.distributed import destroy_distributed
from sara_megatron.training import load_train_config, train


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="run YAML (see examples/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-5 (repeatable)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule keeps "
                   "its full length, so a later run resumes the same trajectory)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_train_config(args.config, args.overrides)
    try:
        train(cfg, max_steps=args.max_steps)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
