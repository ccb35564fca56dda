"""Evaluate a model as the paper did: Global-MMLU, BELEBELE and MGSM with its \\boxed{} prompts.

The entry point of a checkout; the tool itself is `sara_megatron.cli.evaluate` (installed as
`sara-evaluate`), with the same flags. `python tools/evaluate.py --help` describes them.
"""

import sys

from sara_megatron.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
