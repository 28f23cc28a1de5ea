"""The repository's own files: no merge left half done.

A merge once committed conflict markers into docs/performance.md (eighth session); nothing else
would have failed, since the tests do not read the docs.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)


def test_no_conflict_markers_in_the_sources_and_docs():
    files = [p for part in ("ernie_cli", "tests", "docs", "benchmarks") for p in (ROOT / part).rglob("*")
             if p.suffix in (".py", ".md", ".sh", ".c", ".json", ".toml")]
    files += [ROOT / "README.md", ROOT / "pyproject.toml"]
    assert len(files) > 50
    marked = [str(p.relative_to(ROOT)) for p in files if MARKER.search(p.read_text(errors="replace"))]
    assert marked == []
