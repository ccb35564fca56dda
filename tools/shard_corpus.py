"""Parallel corpus (JSONL) -> Megatron indexed token shards per language, with sample metadata.

The entry point of a checkout; the tool itself is `sara_megatron.cli.shard_corpus` (installed as
`sara-shard-corpus`), with the same flags. `python tools/shard_corpus.py --help` describes them.
"""

import sys

from sara_megatron.cli.shard_corpus import main

if __name__ == "__main__":
    sys.exit(main())
