"""The public functions and classes of every module of the package keep Google-style docstrings a
newcomer can scan: every one has a docstring; every parameter is named under `Args:` (the class's or its
`__init__`'s for a constructor); a function that returns a value says what under `Returns:` (or
`Yields:`), unless its summary already is that value ("The ...", "Whether ...").

Read from the source with `ast`, so nothing is imported. Private names (`_x`), dunder methods and
functions nested in functions are not checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from launch import REPO

PACKAGE = REPO / "sara_megatron"
# A summary that names what is returned (Google: "the Returns section may be omitted if the
# docstring starts with Returns or Yields and the opening sentence describes the value").
NAMES_ITS_VALUE = re.compile(r"^(The|A|An|Whether|Returns|Yields|How|What|Which|Where|Why|When)\b")
SECTION = re.compile(r"^\s*(Args|Arguments|Attributes|Returns|Yields|Raises|Example|Examples|"
                     r"Note|Notes):\s*$", re.MULTILINE)


def checked_files() -> list[Path]:
    """Every module of the package."""
    return sorted(PACKAGE.rglob("*.py"))


def section(doc: str, name: str) -> str | None:
    """The text of one section of a Google docstring (up to the next section), or None."""
    found = re.search(rf"^\s*{name}:\s*$", doc, re.MULTILINE)
    if found is None:
        return None
    rest = doc[found.end():]
    following = SECTION.search(rest)
    return rest[:following.start()] if following else rest


def documented_names(doc: str) -> set[str]:
    """Names documented under Args: (`name:`, `*args:`, or `a, b:` for two alike)."""
    text = section(doc, "Args") or ""
    names = set()
    for entry in re.findall(r"^\s*([\w*, ]+?)(?:\s*\([^)]*\))?:", text, re.MULTILINE):
        names.update(n.strip().lstrip("*") for n in entry.split(","))
    return names


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [n for n in names if n not in ("self", "cls")]


def returns_value(node) -> bool:
    if node.returns is None:
        return False
    returns = ast.unparse(node.returns)
    return returns not in ("None", "NoReturn") and not returns.startswith(("Iterator[None",))


def is_property(node) -> bool:
    return any(ast.unparse(d).endswith(("property", "setter", "cached_property"))
               for d in node.decorator_list)


def problems_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = path.relative_to(REPO)
    problems = []

    def check_function(node, name, doc_of_args=None):
        doc = ast.get_docstring(node)
        if not doc:
            problems.append(f"{where}:{node.lineno} {name}: no docstring")
            return
        missing = [p for p in parameters(node)
                   if p not in documented_names(doc) | documented_names(doc_of_args or "")]
        if missing:
            problems.append(f"{where}:{node.lineno} {name}: Args lacks {', '.join(missing)}")
        if (returns_value(node) and not is_property(node) and section(doc, "Returns") is None
                and section(doc, "Yields") is None and not NAMES_ITS_VALUE.match(doc)):
            problems.append(f"{where}:{node.lineno} {name}: no Returns")

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            check_function(node, node.name)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if not doc:
                problems.append(f"{where}:{node.lineno} {node.name}: no docstring")
                continue
            for member in node.body:
                if not isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                name = f"{node.name}.{member.name}"
                if member.name == "__init__":
                    own = ast.get_docstring(member) or ""
                    missing = [p for p in parameters(member)
                               if p not in documented_names(doc) | documented_names(own)]
                    if missing:
                        problems.append(f"{where}:{member.lineno} {name}: Args (of the class "
                                        f"or __init__) lacks {', '.join(missing)}")
                elif not member.name.startswith("_"):
                    check_function(member, name, doc_of_args=None)
    return problems


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_public_names_have_google_docstrings(path):
    problems = problems_of(path)
    assert not problems, "\n".join(problems)


def test_the_check_finds_what_is_missing(tmp_path):
    """The checker itself: each kind of gap is reported, a complete docstring is not."""
    source = tmp_path / "example.py"
    source.write_text('''
def bare(x): pass

def no_args(x) -> int:
    """Something about it.

    Returns:
        A number.
    """

def no_returns(x) -> int:
    """Compute it.

    Args:
        x: The input.
    """

def fine(x, *rest, key=None) -> int:
    """The value of x.

    Args:
        x: The input.
        *rest: More inputs.
        key: A key.
    """

class Plain:
    def __init__(self, size):
        pass

class Documented:
    """A thing.

    Args:
        size, depth: Its extent.
    """

    def __init__(self, size, depth):
        pass
''', encoding="utf-8")
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        found = problems_of(source)
    finally:
        REPO = saved
    assert [p.split(" ", 1)[1] for p in found] == [
        "bare: no docstring", "no_args: Args lacks x", "no_returns: no Returns",
        "Plain: no docstring"]
