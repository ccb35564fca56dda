"""Which TP/EP/PP/DP layouts of a job fit the GPUs' memory? Planned on the CPU, no GPU or weights.

The entry point of a checkout; the tool itself is `sara_megatron.cli.plan_layout` (installed as
`sara-plan-layout`), with the same flags. `python tools/plan_layout.py --help` describes them.
"""

import sys

from sara_megatron.cli.plan_layout import main

if __name__ == "__main__":
    sys.exit(main())
