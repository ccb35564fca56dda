"""Dense routing report of a model on synthetic tokens (TP and EP layouts).

The entry point of a checkout; the tool itself is `sara_megatron.cli.routing_report` (installed as
`sara-routing-report`), with the same flags. `python tools/routing_report.py --help` describes them.
"""

import sys

from sara_megatron.cli.routing_report import main

if __name__ == "__main__":
    sys.exit(main())
