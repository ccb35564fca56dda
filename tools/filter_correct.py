"""Keep the anchor samples the model answered correctly, as parallel-corpus records.

The entry point of a checkout; the tool itself is `sara_megatron.cli.filter_correct` (installed as
`sara-filter-correct`), with the same flags. `python tools/filter_correct.py --help` describes them.
"""

import sys

from sara_megatron.cli.filter_correct import main

if __name__ == "__main__":
    sys.exit(main())
