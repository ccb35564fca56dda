"""Per-layer routing divergence JS(anchor ‖ target) of a checkpoint.

The entry point of a checkout; the tool itself is `sara_megatron.cli.routing_divergence` (installed as
`sara-routing-divergence`), with the same flags. `python tools/routing_divergence.py --help` describes them.
"""

import sys

from sara_megatron.cli.routing_divergence import main

if __name__ == "__main__":
    sys.exit(main())
