"""`make experiment`: the paper's claim tested end to end at small scale on CPU.

The entry point of a checkout; the tool itself is `sara_megatron.cli.experiment` (installed as
`sara-experiment`), with the same flags. `python tools/experiment.py --help` describes them.
"""

import sys

from sara_megatron.cli.experiment import main

if __name__ == "__main__":
    sys.exit(main())
