"""Is the treatment better than the baseline? The paper's paired t-test over languages (Appendix A.4).

The entry point of a checkout; the tool itself is `sara_megatron.cli.significance` (installed as
`sara-significance`), with the same flags. `python tools/significance.py --help` describes them.
"""

import sys

from sara_megatron.cli.significance import main

if __name__ == "__main__":
    sys.exit(main())
