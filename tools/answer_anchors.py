"""Ask a model to answer the anchor samples (GSM8K, MMLU-ProX) over the OpenAI-compatible chat API.

The entry point of a checkout; the tool itself is `sara_megatron.cli.answer_anchors` (installed as
`sara-answer-anchors`), with the same flags. `python tools/answer_anchors.py --help` describes them.
"""

import sys

from sara_megatron.cli.answer_anchors import main

if __name__ == "__main__":
    sys.exit(main())
