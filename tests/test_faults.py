"""The fault campaign, short: one history of a real service under every fault kind, checked.
`make faults` runs it for longer; tests/test_fault_checker.py tests the checker itself."""

from __future__ import annotations

import pytest

from tests.faults.campaign import FAULT_KINDS, run_history

pytestmark = pytest.mark.slow


def test_a_history_under_every_fault_kind_has_no_anomaly() -> None:
    summary = run_history(20, workers=3)
    assert summary.anomalies == [] and summary.undecided == [], summary.as_dict()
    assert summary.outcomes["ok"] > 1000
    # a supervisord restart takes seconds, so the count depends on the draw: at least a few
    assert sum(summary.faults.values()) >= 4, summary.faults
    assert len(summary.faults) >= 2, summary.faults  # several kinds, chosen at random
    assert set(summary.faults) <= set(FAULT_KINDS)
