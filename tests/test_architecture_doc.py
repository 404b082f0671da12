"""docs/architecture.md names real places: every path it writes in backticks exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"


def _paths(text: str) -> set[str]:
    """Backticked words that are paths: a slash or a file suffix, no spaces or calls."""
    found = set()
    for word in re.findall(r"`([^`\n]+)`", text):
        if re.fullmatch(r"[\w.\-/]+", word) and ("/" in word or re.search(r"\.(py|md|toml|json|txt)$", word)):
            found.add(word)
    return found


def test_every_path_the_architecture_page_names_exists():
    text = PAGE.read_text(encoding="utf-8")
    paths = _paths(text)
    # the page's anchors, so a page that lost its paths (or a pattern that finds none) fails
    assert {"hyca/engine/contract.py", "hyca/layouts.py", "hyca/adapters/webui/registry.py"} <= paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_path_pattern_sees_paths_and_skips_code():
    text = "`hyca/a.py` `README.md` `python -m hyca` `patches_replace[\"dit\"]` `cat(txt, img)` `all`"
    assert _paths(text) == {"hyca/a.py", "README.md"}
