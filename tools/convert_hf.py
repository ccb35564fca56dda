"""Hugging Face ⇄ Megatron-Core checkpoints for Qwen3-MoE and PhiMoE.

The entry point of a checkout; the tool itself is `sara_megatron.cli.convert_hf` (installed as
`sara-convert-hf`), with the same flags. `python tools/convert_hf.py --help` describes them.
"""

import sys

from sara_megatron.cli.convert_hf import main

if __name__ == "__main__":
    sys.exit(main())
