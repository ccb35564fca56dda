"""One report of runs, evaluations and routing divergence: report.md plus its PNG figures.

The entry point of a checkout; the tool itself is `sara_megatron.cli.report` (installed as
`sara-report`), with the same flags. `python tools/report.py --help` describes them.
"""

import sys

from sara_megatron.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
