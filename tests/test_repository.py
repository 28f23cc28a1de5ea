"""The repository's own docs: every file they name is there.

README.md and docs/*.md name scripts, tests and sources in backticks and links; when one of those is
renamed or deleted nothing else fails, so a reader is left with a command that cannot run.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("ernie_cli/", "tests/", "docs/", "benchmarks/", ".ci/")
TOP_FILES = ("pyproject.toml", "README.md")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
CODE = re.compile(r"`([^`]+)`")  # an inline span may wrap onto the next line
LINK = re.compile(r"\]\(([^)\s]+)\)")


def repository_path(token: str) -> str | None:
    """The repository path a code token names, without a `::test` suffix, a line number or trailing
    punctuation; None when the token names none (or names several, as a glob)."""
    if "..." in token:  # an elided path
        return None
    token = token.strip("\"'()[]{}<>,;").removeprefix("./")
    token = token.split("::")[0].split("#")[0]
    token = re.sub(r"(:\d+(-\d+)?)+$", "", token).rstrip(".,;:)")
    if not (token.startswith(TOP) or token in TOP_FILES):
        return None
    if any(c in token for c in "*?[]{}<>$"):
        return None
    return token


def named_paths(doc: Path) -> list[tuple[str, Path]]:
    """(what the doc says, where that is) for every repository path in doc's code and links."""
    text = doc.read_text()
    code = [m.group(1) for m in FENCE.finditer(text)]
    code += CODE.findall(FENCE.sub("", text))
    found = [(p, ROOT / p) for span in code for p in map(repository_path, span.split()) if p]
    for target in LINK.findall(text):
        target = target.split("#")[0]
        if target and not re.match(r"^[a-z]+:", target):  # links resolve against the linking file
            found.append((target, (doc.parent / target).resolve()))
    return found


def test_repository_path_parsing():
    assert repository_path("benchmarks/gpu_profile.py") == "benchmarks/gpu_profile.py"
    assert repository_path("tests/test_bench.py::test_weight_bytes_per_token_by_hand") == "tests/test_bench.py"
    assert repository_path("ernie_cli/model/ernie.py:394") == "ernie_cli/model/ernie.py"
    assert repository_path("ernie_cli/model/ernie.py:12-30,") == "ernie_cli/model/ernie.py"
    assert repository_path("(docs/quantize.md).") == "docs/quantize.md"
    assert repository_path("docs/*.md") is None
    assert repository_path("benchmarks/configs/...") is None
    assert repository_path("model.Linear") is None
    assert repository_path("/tmp/tests/x.py") is None
    assert repository_path("pyproject.toml") == "pyproject.toml"


def test_every_repository_path_the_docs_name_exists():
    named = [(doc, said, where) for doc in DOCS for said, where in named_paths(doc)]
    assert len(named) > 20  # the docs name many files; none found would mean the parsing broke
    missing = sorted({f"{doc.relative_to(ROOT)}: {said}" for doc, said, where in named if not where.exists()})
    assert missing == []


def test_no_doc_cites_files_outside_the_repository():
    citing = [str(doc.relative_to(ROOT)) for doc in DOCS if "performance-facts.md" in doc.read_text()]
    assert citing == []
