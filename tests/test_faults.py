"""The fault campaign, short: one history of a real service under every fault kind, checked.
`make faults` runs it for longer; tests/test_fault_checker.py tests the checker itself."""

from __future__ import annotations

import pytest

from tests.faults.campaign import FAULT_KINDS, run_history

pytestmark = pytest.mark.slow


def test_a_history_under_every_fault_kind_has_no_anomaly() -> None:
    summary = run_history(20, workers=3)
    assert summary.anomalies == [], summary.as_dict()
    assert summary.outcomes["ok"] > 1000
    assert sum(summary.faults.values()) >= 8, summary.faults
    assert len(summary.faults) >= 3, summary.faults  # several kinds, chosen at random
    assert set(summary.faults) <= set(FAULT_KINDS)
