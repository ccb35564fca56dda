"""Extract ShifCon's language vectors: the mean hidden state entering chosen layers, per language.

The entry point of a checkout; the tool itself is `sara_megatron.cli.extract_language_vectors` (installed as
`sara-extract-language-vectors`), with the same flags. `python tools/extract_language_vectors.py --help` describes them.
"""

import sys

from sara_megatron.cli.extract_language_vectors import main

if __name__ == "__main__":
    sys.exit(main())
