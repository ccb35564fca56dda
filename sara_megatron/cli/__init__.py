"""The command-line tools: one module per tool, each with a `main(argv=None)`.

Every tool runs three ways with the same flags and behaviour: `python tools/<tool>.py` from a
checkout, `python -m sara_megatron.cli.<tool>`, and the console script `sara-<tool>` (underscores
become hyphens: `sara-train`, `sara-convert-hf`, `sara-shard-corpus`) that `pip install` puts on
the PATH. Multi-rank tools start under torchrun with `-m`: `python -m sara_megatron.torchrun
--nproc-per-node 8 -m sara_megatron.cli.train --config ...`. `launcher` runs them in
subprocesses for the demo, the experiment and the tests.
"""

# The tools, by module name; the console script of each is `sara-` + its name with hyphens.
TOOLS = (
    "answer_anchors", "convert_hf", "demo", "evaluate", "experiment", "extract_language_vectors",
    "extract_priors", "filter_correct", "plan_layout", "report", "routing_divergence",
    "routing_report", "shard_corpus", "significance", "train", "translate_corpus",
)


def console_script(tool: str) -> str:
    """The console script's name of `tool`.

    Args:
        tool: a module name of `TOOLS`, e.g. "shard_corpus".

    Returns:
        The command `pip install` puts on the PATH, e.g. "sara-shard-corpus".
    """
    return "sara-" + tool.replace("_", "-")
