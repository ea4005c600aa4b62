"""The history checker on hand-made histories: the ones a correct store may produce pass, each
kind of anomaly the fault campaign hunts fails (a checker that passes everything is no check)."""

from __future__ import annotations

import math
import random
from pathlib import Path

from tests.faults import checker
from tests.faults.history import FAIL, OK, UNKNOWN, Op, Recorder, load


def op(kind: str, value: object, outcome: str, output: object, start: float, end: float,
       process: str = "p", key: str = "k") -> Op:
    return Op(process, key, kind, value, outcome, output, start,
              math.inf if outcome == UNKNOWN else end)


def linearizable(*ops: Op) -> bool:
    return checker.check(ops).ok


def test_sequential_writes_and_reads_pass_and_a_stale_read_fails() -> None:
    w1 = op("write", "a", OK, None, 0, 1)
    w2 = op("write", "b", OK, None, 2, 3)
    assert linearizable(w1, w2, op("read", None, OK, "b", 4, 5))
    # read after w2 was acked must not see a: real-time order
    assert not linearizable(w1, w2, op("read", None, OK, "a", 4, 5))
    # a read that began before w2 was acked may see either
    assert linearizable(w1, w2, op("read", None, OK, "a", 2.5, 5))
    assert linearizable(w1, w2, op("read", None, OK, "b", 2.5, 5))


def test_concurrent_reads_must_agree_with_one_order() -> None:
    w1 = op("write", "a", OK, None, 0, 1)
    w2 = op("write", "b", OK, None, 2, 10, process="q")
    # both reads overlap w2; the first sees b, then a later one sees a: no order allows it
    r1 = op("read", None, OK, "b", 3, 4, process="r")
    r2 = op("read", None, OK, "a", 5, 6, process="s")
    assert not linearizable(w1, w2, r1, r2)
    assert linearizable(w1, w2, op("read", None, OK, "a", 3, 4, process="r"),
                        op("read", None, OK, "b", 5, 6, process="s"))


def test_a_failed_write_is_never_visible_and_an_unknown_one_may_be() -> None:
    w1 = op("write", "a", OK, None, 0, 1)
    bad = op("write", "x", FAIL, None, 2, 3)
    assert not linearizable(w1, bad, op("read", None, OK, "x", 4, 5))
    assert linearizable(w1, bad, op("read", None, OK, "a", 4, 5))
    lost = op("write", "y", UNKNOWN, None, 2, 0)
    assert linearizable(w1, lost, op("read", None, OK, "y", 4, 5))
    assert linearizable(w1, lost, op("read", None, OK, "a", 4, 5))
    # ... but not both ways: once seen, an unknown write cannot be undone by nothing
    assert not linearizable(w1, lost, op("read", None, OK, "y", 4, 5),
                            op("read", None, OK, "a", 6, 7))


def test_a_read_of_a_value_nobody_wrote_fails() -> None:
    assert not linearizable(op("write", "a", OK, None, 0, 1), op("read", None, OK, "z", 2, 3))
    assert linearizable(op("read", None, OK, None, 0, 1))  # an absent key reads None
    assert not linearizable(op("write", "a", OK, None, 0, 1), op("read", None, OK, None, 2, 3))


def test_deletes_and_compare_and_set() -> None:
    w = op("write", "a", OK, None, 0, 1)
    assert linearizable(w, op("delete", None, OK, None, 2, 3), op("read", None, OK, None, 4, 5))
    assert linearizable(w, op("cas", ("a", "b"), OK, True, 2, 3), op("read", None, OK, "b", 4, 5))
    # a cas that says it applied, from a state it could not apply in
    assert not linearizable(w, op("cas", ("z", "b"), OK, True, 2, 3))
    # a cas that says it did not apply although the value matched and nothing else ran
    assert not linearizable(w, op("cas", ("a", "b"), OK, False, 2, 3))
    # an unknown cas may or may not have applied
    maybe = op("cas", ("a", "b"), UNKNOWN, None, 2, 0)
    assert linearizable(w, maybe, op("read", None, OK, "b", 4, 5))
    assert linearizable(w, maybe, op("read", None, OK, "a", 4, 5))


def test_increments_must_add_up() -> None:
    i1 = op("incr", 1, OK, 1, 0, 1)
    i2 = op("incr", 1, OK, 2, 2, 3)
    assert linearizable(i1, i2, op("read", None, OK, 2, 4, 5))
    assert not linearizable(i1, i2, op("read", None, OK, 3, 4, 5))  # applied twice
    assert not linearizable(i1, op("incr", 1, OK, 1, 2, 3))  # an increment lost
    retried = op("incr", 1, UNKNOWN, None, 2, 0)
    assert linearizable(i1, retried, op("read", None, OK, 2, 4, 5))
    assert linearizable(i1, retried, op("read", None, OK, 1, 4, 5))
    assert not linearizable(i1, retried, op("read", None, OK, 3, 4, 5))
    assert checker.check_counter("c", [i1, i2, retried], 3) == []
    assert checker.check_counter("c", [i1, i2, retried], 2) == []
    assert checker.check_counter("c", [i1, i2, retried], 4) != []
    assert checker.check_counter("c", [i1, i2, retried], 1) != []


def test_keys_are_checked_apart_and_the_anomaly_names_its_key() -> None:
    ops = [op("write", "a", OK, None, 0, 1, key="k1"), op("write", "b", OK, None, 0, 1, key="k2"),
           op("read", None, OK, "a", 2, 3, key="k1"), op("read", None, OK, "a", 2, 3, key="k2")]
    result = checker.check(ops)
    assert not result.ok and len(result.anomalies) == 1
    assert result.anomalies[0].startswith("key k2: no order explains read")
    assert result.ops == 4


def test_many_overlapping_writers_on_one_key() -> None:
    """Six writers at once, sixty times, each round read after it: only the order in which
    the last writer of each round comes last explains the reads."""
    ops = []
    t = 0.0
    for round_ in range(60):
        for p in range(6):
            ops.append(op("write", f"{round_}-{p}", OK, None, t + p * 0.01, t + 1, process=f"w{p}"))
        ops.append(op("read", None, OK, f"{round_}-5", t + 1.5, t + 1.6, process="r"))
        t += 2
    assert linearizable(*ops)
    ops[-1] = op("read", None, OK, "58-5", t - 0.5, t - 0.4, process="r")  # an old round's
    assert not linearizable(*ops)


def test_recorded_files_load_with_killed_processes_as_unknown(tmp_path: Path) -> None:
    with Recorder(tmp_path / "a.jsonl", "a") as rec:
        i = rec.invoke("k", "write", "v1")
        rec.complete(i, OK)
        i = rec.invoke("k", "cas", ("v1", "v2"))
        rec.complete(i, OK, True)
        rec.invoke("k", "write", "v3")  # killed before the answer
    (tmp_path / "a.jsonl").open("a").write('{"e":"inv')  # and mid-line
    with Recorder(tmp_path / "b.jsonl", "b") as rec:
        i = rec.invoke("k", "read")
        rec.complete(i, OK, "v2")
    ops = load([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    assert [(o.kind, o.outcome) for o in ops] == [
        ("write", OK), ("cas", OK), ("write", UNKNOWN), ("read", OK)]
    assert ops[1].value == ("v1", "v2") and ops[2].end == math.inf
    assert checker.check(ops).ok


def test_unknown_writes_nobody_observed_are_left_out_of_the_search() -> None:
    """After a restart many writes end unknown; those no read saw cannot change a verdict."""
    ops = [op("write", "a", OK, None, 0, 1)]
    ops += [op("write", f"lost{i}", UNKNOWN, None, 2 + i * 0.001, 0, process=f"p{i}")
            for i in range(300)]
    ops.append(op("read", None, OK, "a", 3, 4))
    ops.append(op("read", None, OK, "lost7", 5, 6))  # this one was applied after all
    assert [o.value for o in checker.relevant(ops) if o.kind == "write"] == ["a", "lost7"]
    assert linearizable(*ops)
    assert not linearizable(*ops, op("read", None, OK, "a", 7, 8))  # and it cannot be undone


def test_a_refused_cas_an_unseen_unknown_write_may_explain_is_not_held_against_the_store(
) -> None:
    w = op("write", "a", OK, None, 0, 1)
    lost = op("write", "x", UNKNOWN, None, 2, 0, process="q")
    read = op("read", None, OK, "a", 2.1, 2.2)
    refused = op("cas", ("a", "b"), OK, False, 2.3, 2.4)  # the lost write landed first
    assert linearizable(w, lost, read, refused)
    assert not linearizable(w, read, refused)  # without it nothing explains the refusal


def test_increment_bounds_agree_with_their_definition() -> None:
    """The counter check sums by prefix sums (a long history's counters have tens of
    thousands of increments); it must find exactly what the definition does, ties included
    (whole-second times, so ends and starts often meet)."""

    def by_definition(ops: list[Op]) -> list[str]:
        incrs = [o for o in ops if o.kind == "incr" and o.outcome != FAIL]
        acked = [o for o in incrs if o.outcome == OK]
        problems, seen = [], set()
        for x in acked:
            low = x.value + sum(o.value for o in acked if o.end < x.start)
            high = x.value + sum(o.value for o in incrs if o is not x and o.start < x.end)
            if not low <= x.output <= high:
                problems.append(f"incr by {x.process} returned {x.output}, expected {low} to "
                                f"{high}")
            if x.output in seen:
                problems.append(f"two increments returned {x.output}")
            seen.add(x.output)
        for r in ops:
            if r.kind == "read" and r.outcome == OK:
                low = sum(o.value for o in acked if o.end < r.start)
                high = sum(o.value for o in incrs if o.start < r.end)
                if not low <= (r.output or 0) <= high:
                    problems.append(f"read returned {r.output}, expected {low} to {high}")
        return problems

    rng = random.Random(7)
    failing = 0
    for _ in range(400):
        ops, total = [], 0
        for i in range(rng.randrange(1, 8)):
            start = rng.randrange(10)
            end = start + rng.randrange(3)
            if rng.random() < 0.3:
                ops.append(op("read", None, OK, total + rng.choice((0, 0, 0, -1, 1)), start, end))
                continue
            total += 1
            outcome = rng.choice((OK, OK, OK, UNKNOWN, FAIL))
            output = total + rng.choice((0, 0, 0, 0, -1, 1, 2)) if outcome == OK else None
            ops.append(op("incr", 1, outcome, output, start, end, process=f"p{i}"))
        ops.sort(key=lambda o: o.start)
        expected = by_definition(ops)
        got = checker.check_increments("c", ops)
        assert got.ok == (not expected) and got.detail == "; ".join(expected[:3]), ops
        failing += bool(expected)
    assert 50 < failing < 350  # both verdicts drawn often (the draw is seeded)


def test_a_history_is_cut_only_after_an_operation_alone_in_time_that_fixes_the_state() -> None:
    wa = op("write", "a", OK, None, 0, 1)
    wb, wc = op("write", "b", OK, None, 2, 4), op("write", "c", OK, None, 3, 5, process="q")
    rc = op("read", None, OK, "c", 6, 7)
    lost = Op("q", "k", "write", "x", UNKNOWN, None, 8, 8 + checker.LATE_WRITE_SECONDS)
    rc2 = op("read", None, OK, "c", 9, 10)  # alone but for the unknown write still open
    rx = op("read", None, OK, "x", 14, 15)
    refused = op("cas", ("z", "y"), OK, False, 16, 17)  # alone, but the state is unknown after
    rx2 = op("read", None, OK, "x", 18, 19)
    r3 = op("read", None, OK, "x", 20, 21)
    wd = op("write", "d", OK, None, 21, 22, process="q")  # touches r3: concurrent
    rd = op("read", None, OK, "d", 23, 24)
    ops = [wa, wb, wc, rc, lost, rc2, rx, refused, rx2, r3, wd, rd]
    assert checker.chunks(ops) == [[wa], [wb, wc, rc], [lost, rc2, rx], [refused, rx2],
                                   [r3, wd, rd]]
    assert linearizable(*ops)


def test_the_state_is_carried_across_a_cut() -> None:
    wa, wb = op("write", "a", OK, None, 0, 2), op("write", "b", OK, None, 1, 3, process="q")
    # concurrent writes: either may be last, so no cut may carry just one of them
    assert linearizable(wa, wb, op("read", None, OK, "a", 4, 5))
    assert linearizable(wa, wb, op("read", None, OK, "b", 4, 5))
    # but once a read fixed it, the state after the cut is that one
    assert not linearizable(wa, wb, op("read", None, OK, "a", 4, 5),
                            op("read", None, OK, "b", 6, 7))
    w = op("write", "a", OK, None, 0, 1)
    swap = op("cas", ("a", "b"), OK, True, 2, 3)
    assert linearizable(w, swap, op("read", None, OK, "b", 4, 5))
    assert not linearizable(w, swap, op("read", None, OK, "a", 4, 5))
    assert not linearizable(w, op("delete", None, OK, None, 2, 3), op("read", None, OK, "a", 4, 5))
    # a refused cas leaves the state as it was, whatever that was: it fixes nothing
    assert linearizable(w, op("cas", ("z", "b"), OK, False, 2, 3), op("read", None, OK, "a", 4, 5))
    # an unknown write may land after a read that saw the older value, within its 5 s...
    lost = op("write", "x", UNKNOWN, None, 2, 0, process="q")
    ra = op("read", None, OK, "a", 3, 4)
    assert linearizable(w, lost, ra, op("read", None, OK, "x", 6, 6.5))
    assert linearizable(w, lost, ra, op("read", None, OK, "x", 10, 11))
    # ... and once seen, stays
    assert not linearizable(w, lost, ra, op("read", None, OK, "x", 6, 6.5),
                            op("read", None, OK, "a", 8, 9))


def test_a_long_history_is_searched_chunk_by_chunk() -> None:
    """The budget is a chunk's: a history far longer than it is decided, and an anomaly
    late in it is found, not lost in a search backtracking through everything before."""
    ops = []
    for i in range(5000):
        ops.append(op("write", f"v{i}", OK, None, 4 * i, 4 * i + 1))
        ops.append(op("read", None, OK, f"v{i}", 4 * i + 2, 4 * i + 3))
    assert checker.check_register("k", ops, budget=100).ok is True
    stale = op("read", None, OK, "v4000", 30000, 30001)
    bad = checker.check_register("k", [*ops, stale], budget=100)
    assert bad.ok is False and "read(None) -> ok 'v4000'" in bad.detail
