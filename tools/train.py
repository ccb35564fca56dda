"""SARA fine-tuning (torchrun / srun). One YAML per run, `--set section.key=value` overrides.

The entry point of a checkout; the tool itself is `sara_megatron.cli.train` (installed as
`sara-train`), with the same flags. `python tools/train.py --help` describes them.
"""

import sys

from sara_megatron.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
