"""Translate an anchor-language corpus into target languages with any OpenAI-compatible model.

The entry point of a checkout; the tool itself is `sara_megatron.cli.translate_corpus` (installed as
`sara-translate-corpus`), with the same flags. `python tools/translate_corpus.py --help` describes them.
"""

import sys

from sara_megatron.cli.translate_corpus import main

if __name__ == "__main__":
    sys.exit(main())
