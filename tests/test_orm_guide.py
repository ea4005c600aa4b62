"""Every ```python block of docs/orm-guide.md runs, so the guide cannot drift from the code.

Blocks run in order, one namespace per "## " section, in a temporary directory. A block whose
fence says ``needs=<hook>`` shows behaviour that needs a hook in the store's scan or write path;
it runs once that hook is there (see the integration notes in test_hints.py).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import lmshard.txn
from lmshard import hints

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "orm-guide.md"

HOOKS = {
    "scan-hints": "hints" in inspect.getsource(lmshard.txn.ReadTxn.scan),
    "large-value-warning": "large_value_warning" in inspect.getsource(lmshard.txn),
}

Block = tuple[int, str, str]  # (first code line, fence info, code)


def parse(text: str) -> dict[str, list[Block]]:
    """Section title -> its python blocks; headings inside any fenced block are ignored."""
    sections: dict[str, list[Block]] = {}
    title = "(before the first section)"
    fence: str | None = None
    info = ""
    start = 0
    body: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if fence is None:
            m = re.match(r"^(```+)\s*(\S*)(.*)$", line)
            if m:
                fence, lang, info = m.group(1), m.group(2), m.group(3).strip()
                start, body = n + 1, []
                if lang != "python":
                    info = "skip"
            elif line.startswith("## "):
                title = line[3:].strip()
                sections.setdefault(title, [])
        elif line.strip() == fence:
            if info != "skip":
                sections.setdefault(title, []).append((start, info, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    assert fence is None, "an unclosed code fence in the guide"
    return {t: blocks for t, blocks in sections.items() if blocks}


SECTIONS = parse(GUIDE.read_text(encoding="utf-8"))


def test_the_guide_has_a_section_per_practice() -> None:
    wanted = [
        "Schema design", "Transaction patterns", "Index usage", "Serialization choices",
        "Time series", "Integer scaling", "Error handling", "Performance patterns",
        "Testing strategies", "Deployment", "Monitoring and debugging", "Change feed",
        "Anti-patterns",
    ]
    titles = [line[3:].strip() for line in GUIDE.read_text().splitlines()
              if line.startswith("## ")]
    for want in wanted:
        assert any(t.startswith(want) for t in titles), want
    assert sum(len(b) for b in SECTIONS.values()) >= 20


@pytest.mark.parametrize("title", list(SECTIONS))
def test_guide_section_runs(
    title: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # the examples import tests.fbs (a flatc output)
    hints.reset_hints()
    namespace: dict[str, object] = {"__name__": "orm_guide"}
    skipped = []
    for start, info, code in SECTIONS[title]:
        needs = dict(re.findall(r"(\w+)=(\S+)", info)).get("needs")
        if needs is not None:
            assert needs in HOOKS, f"unknown hook {needs!r} at line {start}"
            if not HOOKS[needs]:
                skipped.append(start)
                continue
        # Padding keeps line numbers: a traceback points at the line in the guide.
        exec(compile("\n" * (start - 1) + code, str(GUIDE), "exec"), namespace)
    hints.reset_hints()
    if skipped:
        pytest.skip(f"blocks at lines {skipped} wait for a store hook (the rest ran)")
