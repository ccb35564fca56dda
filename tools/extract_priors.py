"""Extract anchor routing priors into a prior store (torchrun; any TP / EP / PP / DP layout).

The entry point of a checkout; the tool itself is `sara_megatron.cli.extract_priors` (installed as
`sara-extract-priors`), with the same flags. `python tools/extract_priors.py --help` describes them.
"""

import sys

from sara_megatron.cli.extract_priors import main

if __name__ == "__main__":
    sys.exit(main())
