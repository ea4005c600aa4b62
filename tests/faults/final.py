"""``python -m tests.faults.final CONFIG OUT``: the campaign's final reads, from a process of its
own (on another host, say: inside a network namespace), written as JSON to OUT."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from tests.faults.campaign import final_reads
from tests.faults.history import Op


def main(argv: list[str]) -> int:
    ops, totals, problems = final_reads(Path(argv[0]))
    Path(argv[1]).write_text(json.dumps(
        {"ops": [asdict(op) for op in ops], "totals": totals, "problems": problems}))
    return 0


def load(path: Path) -> tuple[list[Op], dict[str, int], list[str]]:
    """What ``main`` wrote."""
    d = json.loads(path.read_text())
    return [Op(**op) for op in d["ops"]], d["totals"], d["problems"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
