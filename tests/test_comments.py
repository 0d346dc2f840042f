"""Comments and docstrings say why in words. A tracker's numbers (an issue, its item codes, its
acceptance list) or an unnamed earlier project mean nothing to someone reading the code later."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Written so that this file does not match itself.
CITATION = re.compile(r"\bissue\s+\d|\bissue'\w|\boriginal\s+project|\bacceptance\s+\d|\bitem\s+\d+:|\(W\d+\)"
                      r"|-- [WD]\d+:|\b[CDWX]\d+:\s", re.IGNORECASE)


def test_no_comment_cites_a_tracker_or_an_unnamed_project():
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for folder in ("src", "tests", "benchmarks") for path in sorted((ROOT / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if CITATION.search(line)]
    assert found == []
