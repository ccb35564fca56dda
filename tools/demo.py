"""The CPU demo of the whole SARA pipeline on a tiny Qwen3-MoE (what `make demo` runs).

The entry point of a checkout; the tool itself is `sara_megatron.cli.demo` (installed as
`sara-demo`), with the same flags. `python tools/demo.py --help` describes them.
"""

import sys

from sara_megatron.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
