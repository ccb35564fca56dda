"""lm-eval hooks of the SARA tasks: the paper's prompts, the last-\\boxed{} filter and the scorer.

Loaded by lm-eval from the task YAML files (`!function utils.<name>`); they call the same code as
our runner (`sara_megatron.prompts`, `sara_megatron.answers`), so lm-eval and `tools/evaluate.py`
ask the same question and score a reply alike.
"""

from lm_eval.api.filter import Filter

from sara_megatron.answers import answer_is_correct, last_boxed
from sara_megatron.evaluation.benchmarks import item_from_row
from sara_megatron.evaluation.tasks import item_prompt

NO_BOX = "[no boxed answer]"


def _item(benchmark, doc):
    # The language only picks a template; these tasks use the paper's English instructions.
    return item_from_row(benchmark, "en", doc, index=0)


def global_mmlu_prompt(doc):
    """The paper's prompt of a global_mmlu row (lm-eval's `doc_to_text`).

    Args:
        doc: The row, in the hub's columns.
    """
    return item_prompt(_item("global_mmlu", doc))


def belebele_prompt(doc):
    """The paper's prompt of a belebele row (lm-eval's `doc_to_text`).

    Args:
        doc: The row, in the hub's columns.
    """
    return item_prompt(_item("belebele", doc))


def mgsm_prompt(doc):
    """The paper's prompt of a mgsm row (lm-eval's `doc_to_text`).

    Args:
        doc: The row, in the hub's columns.
    """
    return item_prompt(_item("mgsm", doc))


def global_mmlu_gold(doc):
    """The gold answer of a global_mmlu row (lm-eval's `doc_to_target`).

    Args:
        doc: The row, in the hub's columns.
    """
    return _item("global_mmlu", doc).gold


def belebele_gold(doc):
    """The gold answer of a belebele row (lm-eval's `doc_to_target`).

    Args:
        doc: The row, in the hub's columns.
    """
    return _item("belebele", doc).gold


def mgsm_gold(doc):
    """The gold answer of a mgsm row (lm-eval's `doc_to_target`).

    Args:
        doc: The row, in the hub's columns.
    """
    return _item("mgsm", doc).gold


class LastBoxedFilter(Filter):
    """Each reply -> the content of its last complete \\boxed{} (balanced braces), or NO_BOX."""

    def apply(self, resps, docs):
        """Filter lm-eval's replies.

        Args:
            resps: Per document, its replies.
            docs: The documents (unused).

        Returns:
            Per document, each reply's last box content or NO_BOX.
        """
        return [[(last_boxed(r if isinstance(r, str) else "") or NO_BOX) for r in replies]
                for replies in resps]


def _score(benchmark, doc, results):
    item = _item(benchmark, doc)
    extracted = None if results[0] == NO_BOX else results[0]
    return {"exact_match": float(answer_is_correct(extracted, item.gold, item.options or None))}


def process_global_mmlu(doc, results):
    """Score one global_mmlu reply (lm-eval's `process_results`).

    Args:
        doc: The row, in the hub's columns.
        results: The filtered reply (`LastBoxedFilter`), first.

    Returns:
        {"exact_match": 1.0 or 0.0}, by `answers.answer_is_correct`.
    """
    return _score("global_mmlu", doc, results)


def process_belebele(doc, results):
    """Score one belebele reply (lm-eval's `process_results`).

    Args:
        doc: The row, in the hub's columns.
        results: The filtered reply (`LastBoxedFilter`), first.

    Returns:
        {"exact_match": 1.0 or 0.0}, by `answers.answer_is_correct`.
    """
    return _score("belebele", doc, results)


def process_mgsm(doc, results):
    """Score one mgsm reply (lm-eval's `process_results`).

    Args:
        doc: The row, in the hub's columns.
        results: The filtered reply (`LastBoxedFilter`), first.

    Returns:
        {"exact_match": 1.0 or 0.0}, by `answers.answer_is_correct`.
    """
    return _score("mgsm", doc, results)
