"""Language codes of the parallel corpus (ISO 639-1, paper Appendix A.1, Table 4).

The paper anchors on en or zh and trains hi, ne, bn, te, sw; its ablation (-q-sw-s) anchors on sw,
so any known code may serve as the anchor. Corpora with other languages extend the set explicitly
(`--extra-languages`) so that a typo such as "hn" is caught instead of becoming a new language.
"""

from __future__ import annotations

import re
from typing import Iterable

LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Chinese",
    "hi": "Hindi",
    "ne": "Nepali",
    "bn": "Bengali",
    "te": "Telugu",
    "sw": "Swahili",
}
PAPER_ANCHOR_LANGUAGES = ("en", "zh")
PAPER_TARGET_LANGUAGES = ("hi", "ne", "bn", "te", "sw")

# ISO 639-1/-3 with an optional script or region subtag ("zh-Hans", "pt-BR").
_CODE_PATTERN = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


def known_languages(extra: Iterable[str] = ()) -> frozenset[str]:
    """The paper's codes plus extra ones.

    Args:
        extra: Further codes (ISO 639 with an optional subtag, e.g. "ta" or "zh-Hant").

    Returns:
        The known codes.

    Raises:
        ValueError: An extra code that does not look like a language code.
    """
    extra = tuple(extra)
    bad = [code for code in extra if not _CODE_PATTERN.match(code)]
    if bad:
        raise ValueError(f"not language codes (ISO 639, e.g. 'ta' or 'zh-Hant'): {bad}")
    return frozenset(LANGUAGE_NAMES) | frozenset(extra)
