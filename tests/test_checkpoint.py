from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from target_catena_messages.outcome import Resolution
from target_catena_messages.pipeline.checkpoint import STATE_KEY, Checkpointer, Totals


def tap_state(n: int) -> dict[str, Any]:
    return {
        "bookmarks": {
            "public-dispatch_messages": {
                "replication_key": "updated_at",
                "replication_key_value": f"2026-11-27T10:00:{n:02d}+00:00",
            }
        },
        "currently_syncing": None,
    }


def marker(line: dict[str, Any]) -> str:
    value = line["bookmarks"]["public-dispatch_messages"]["replication_key_value"]
    assert isinstance(value, str)
    return value


def read(cp: Checkpointer, count: int) -> list[int]:
    return [cp.next_seq() for _ in range(count)]


def accept(cp: Checkpointer, seq: int) -> None:
    cp.resolve(seq, "s", f"k{seq}", Resolution.ACCEPTED, operation_id=f"op{seq}")


def test_sequence_numbers_are_dense_from_one() -> None:
    cp = Checkpointer("run")
    assert read(cp, 3) == [1, 2, 3]
    assert cp.unresolved == 3


def test_no_line_before_first_tap_state() -> None:
    cp = Checkpointer("run")
    for seq in read(cp, 3):
        accept(cp, seq)
    assert not cp.pending_news()
    assert cp.take_line() is None
    cp.add_tap_state(tap_state(1))
    line = cp.take_line()
    assert line is not None
    assert (
        marker(line)
        == tap_state(1)["bookmarks"]["public-dispatch_messages"]["replication_key_value"]
    )
    assert line[STATE_KEY]["operations"] == [
        ["s", "k1", "op1"],
        ["s", "k2", "op2"],
        ["s", "k3", "op3"],
    ]


def test_state_before_any_record_is_safe_at_once() -> None:
    cp = Checkpointer("run")
    cp.add_tap_state(tap_state(0))
    assert cp.pending_news()
    line = cp.take_line()
    assert line is not None
    assert line[STATE_KEY] == {
        "run_id": "run",
        "operations": [],
        "dead_letters": [],
        "totals": {"accepted": 0, "duplicates": 0, "dead_lettered": 0, "expired": 0},
    }
    assert not cp.pending_news()


def test_in_order_resolution_emits_each_state_when_its_records_resolve() -> None:
    cp = Checkpointer("run")
    read(cp, 2)
    cp.add_tap_state(tap_state(2))
    read(cp, 2)
    cp.add_tap_state(tap_state(4))
    accept(cp, 1)
    assert cp.take_line() is None
    accept(cp, 2)
    first = cp.take_line()
    assert first is not None
    assert marker(first).endswith(":02+00:00")
    assert first[STATE_KEY]["operations"] == [["s", "k1", "op1"], ["s", "k2", "op2"]]
    accept(cp, 3)
    assert cp.pending_news()  # a newly resolved record, same safe state
    accept(cp, 4)
    second = cp.take_line()
    assert second is not None
    assert marker(second).endswith(":04+00:00")
    assert second[STATE_KEY]["operations"] == [["s", "k3", "op3"], ["s", "k4", "op4"]]
    assert cp.unresolved == 0


def test_out_of_order_never_emits_a_state_ahead_of_an_unresolved_record() -> None:
    cp = Checkpointer("run")
    read(cp, 1)
    cp.add_tap_state(tap_state(1))
    read(cp, 1)
    cp.add_tap_state(tap_state(2))
    read(cp, 1)
    cp.add_tap_state(tap_state(3))
    accept(cp, 3)
    accept(cp, 2)
    assert cp.take_line() is None  # record 1 still in flight
    assert not cp.pending_news()
    accept(cp, 1)
    line = cp.take_line()
    assert line is not None
    assert marker(line).endswith(":03+00:00")  # newest safe one, older ones skipped
    assert [op[2] for op in line[STATE_KEY]["operations"]] == ["op3", "op2", "op1"]


def test_newest_safe_state_chosen_while_a_later_record_is_unresolved() -> None:
    cp = Checkpointer("run")
    read(cp, 1)
    cp.add_tap_state(tap_state(1))
    read(cp, 1)
    cp.add_tap_state(tap_state(2))
    read(cp, 1)
    cp.add_tap_state(tap_state(3))
    accept(cp, 1)
    accept(cp, 2)
    line = cp.take_line()
    assert line is not None
    assert marker(line).endswith(":02+00:00")
    assert cp.unresolved == 1


def test_safe_state_repeated_with_news_and_silent_without() -> None:
    cp = Checkpointer("run")
    read(cp, 1)
    cp.add_tap_state(tap_state(1))
    read(cp, 2)
    accept(cp, 1)
    assert cp.take_line() is not None
    assert not cp.pending_news()
    accept(cp, 3)
    assert cp.pending_news()
    line = cp.take_line()
    assert line is not None
    assert marker(line).endswith(":01+00:00")
    assert line[STATE_KEY]["operations"] == [["s", "k3", "op3"]]
    assert not cp.pending_news()


def test_tap_keys_preserved_and_value_deep_copied() -> None:
    cp = Checkpointer("run")
    value: dict[str, Any] = {
        "bookmarks": {"a": {"replication_key_value": 5}, "b": {"x": [1, 2]}},
        "currently_syncing": "a",
        "custom": {"nested": {"deep": True}},
    }
    cp.add_tap_state(value)
    value["bookmarks"]["a"]["replication_key_value"] = 999  # caller mutates after handing it over
    line = cp.take_line()
    assert line is not None
    assert line["bookmarks"] == {"a": {"replication_key_value": 5}, "b": {"x": [1, 2]}}
    assert line["currently_syncing"] == "a"
    assert line["custom"] == {"nested": {"deep": True}}
    assert list(line) == ["bookmarks", "currently_syncing", "custom", STATE_KEY]
    line["bookmarks"]["b"]["x"].append(3)  # consumer mutates the line
    again = cp.take_line()
    assert again is not None
    assert again["bookmarks"]["b"]["x"] == [1, 2]


def test_stale_own_key_from_previous_run_replaced() -> None:
    cp = Checkpointer("run-2")
    stale: dict[str, Any] = {
        "bookmarks": {"s": {"replication_key_value": 1}},
        STATE_KEY: {
            "run_id": "run-1",
            "operations": [["s", "old", "old-op"]],
            "dead_letters": [["s", "bad", "api"]],
            "totals": {"accepted": 7, "duplicates": 0, "dead_lettered": 1, "expired": 0},
            "extra": "junk",
        },
    }
    read(cp, 1)
    cp.add_tap_state(stale)
    accept(cp, 1)
    line = cp.take_line()
    assert line is not None
    assert line[STATE_KEY] == {
        "run_id": "run-2",
        "operations": [["s", "k1", "op1"]],
        "dead_letters": [],
        "totals": {"accepted": 1, "duplicates": 0, "dead_lettered": 0, "expired": 0},
    }
    assert line["bookmarks"] == {"s": {"replication_key_value": 1}}


def test_outcomes_lists_and_totals() -> None:
    cp = Checkpointer("run")
    read(cp, 6)
    cp.add_tap_state(tap_state(6))
    cp.resolve(1, "s", "a", Resolution.ACCEPTED, operation_id="op-a")
    cp.resolve(2, "s", "b", Resolution.DUPLICATE, operation_id="op-old")
    cp.resolve(3, "s", "c", Resolution.DEAD_LETTERED, stage="validation")
    cp.resolve(4, "t", "d", Resolution.EXPIRED)
    cp.resolve(5, "t", "e", Resolution.DEAD_LETTERED, stage="ambiguous")
    cp.resolve(6, "t", "f", Resolution.DUPLICATE)  # earlier op id unknown: counted, not listed
    line = cp.take_line()
    assert line is not None
    own = line[STATE_KEY]
    assert own["operations"] == [["s", "a", "op-a"], ["s", "b", "op-old"]]
    assert own["dead_letters"] == [
        ["s", "c", "validation"],
        ["t", "d", "expired"],
        ["t", "e", "ambiguous"],
    ]
    assert own["totals"] == {"accepted": 1, "duplicates": 2, "dead_lettered": 2, "expired": 1}
    assert cp.totals == Totals(accepted=1, duplicates=2, dead_lettered=2, expired=1)


def test_totals_cover_whole_run_while_lists_cover_since_last_line() -> None:
    cp = Checkpointer("run")
    cp.add_tap_state(tap_state(0))
    for seq in read(cp, 3):
        accept(cp, seq)
    first = cp.take_line()
    seq = cp.next_seq()
    cp.resolve(seq, "s", "x", Resolution.DEAD_LETTERED, stage="api")
    second = cp.take_line()
    assert first is not None
    assert second is not None
    assert len(first[STATE_KEY]["operations"]) == 3
    assert second[STATE_KEY]["operations"] == []
    assert second[STATE_KEY]["dead_letters"] == [["s", "x", "api"]]
    assert second[STATE_KEY]["totals"] == {
        "accepted": 3,
        "duplicates": 0,
        "dead_lettered": 1,
        "expired": 0,
    }


def test_lists_capped_at_1000_by_default() -> None:
    cp = Checkpointer("run")
    seqs = read(cp, 2500)
    cp.add_tap_state(tap_state(1))
    for seq in seqs:
        if seq % 2:
            accept(cp, seq)
        else:
            cp.resolve(seq, "s", f"k{seq}", Resolution.DEAD_LETTERED, stage="api")
    line = cp.take_line()
    assert line is not None
    assert len(line[STATE_KEY]["operations"]) == 1000
    assert len(line[STATE_KEY]["dead_letters"]) == 1000
    assert line[STATE_KEY]["operations"][0] == ["s", "k1", "op1"]
    assert line[STATE_KEY]["totals"]["accepted"] == 1250
    assert line[STATE_KEY]["totals"]["dead_lettered"] == 1250
    nxt = cp.take_line()
    assert nxt is not None
    assert nxt[STATE_KEY]["operations"] == []  # dropped entries are not carried over


def test_custom_cap() -> None:
    cp = Checkpointer("run", list_cap=2)
    cp.add_tap_state(tap_state(0))
    for seq in read(cp, 5):
        accept(cp, seq)
    line = cp.take_line()
    assert line is not None
    assert line[STATE_KEY]["operations"] == [["s", "k1", "op1"], ["s", "k2", "op2"]]


def test_double_resolve_and_unknown_seq_are_loud() -> None:
    cp = Checkpointer("run")
    read(cp, 3)
    accept(cp, 1)
    accept(cp, 3)
    with pytest.raises(ValueError, match="already resolved"):
        accept(cp, 1)  # at or below the watermark
    with pytest.raises(ValueError, match="already resolved"):
        accept(cp, 3)  # ahead of the watermark
    with pytest.raises(ValueError, match="never numbered"):
        accept(cp, 4)
    with pytest.raises(ValueError, match="never numbered"):
        accept(cp, 0)
    assert cp.unresolved == 1
    assert cp.totals.accepted == 2


def test_bad_outcomes_are_loud_and_leave_the_record_unresolved() -> None:
    cp = Checkpointer("run")
    read(cp, 1)
    with pytest.raises(ValueError, match="unknown outcome"):
        cp.resolve(1, "s", "k", "sent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="operation id"):
        cp.resolve(1, "s", "k", Resolution.ACCEPTED)
    with pytest.raises(ValueError, match="stage"):
        cp.resolve(1, "s", "k", Resolution.DEAD_LETTERED)
    with pytest.raises(ValueError, match="expired"):
        cp.resolve(1, "s", "k", Resolution.EXPIRED, stage="api")
    assert cp.unresolved == 1
    cp.resolve(1, "s", "k", Resolution.EXPIRED, stage="expired")
    assert cp.unresolved == 0


def test_silent_resolution_advances_state_without_reporting() -> None:
    cp = Checkpointer("run")
    read(cp, 2)
    cp.add_tap_state(tap_state(2))
    accept(cp, 2)
    assert not cp.safe_advanced()
    cp.resolve_silently(1)  # e.g. dead-lettered in an earlier run: not in STATE's lists
    assert cp.safe_advanced()
    line = cp.take_line()
    assert line is not None
    assert marker(line).endswith(":02+00:00")
    assert line[STATE_KEY]["operations"] == [["s", "k2", "op2"]]
    assert line[STATE_KEY]["dead_letters"] == []
    assert line[STATE_KEY]["totals"] == {
        "accepted": 1,
        "duplicates": 0,
        "dead_lettered": 0,
        "expired": 0,
    }
    assert not cp.safe_advanced()
    with pytest.raises(ValueError, match="already resolved"):
        cp.resolve_silently(1)
    with pytest.raises(ValueError, match="never numbered"):
        cp.resolve_silently(3)
    seq = cp.next_seq()
    cp.resolve_silently(seq)
    assert not cp.pending_news()  # nothing to say: same safe state, nothing listed


def test_safe_advanced_only_for_a_newer_safe_state() -> None:
    cp = Checkpointer("run")
    assert not cp.safe_advanced()
    read(cp, 1)
    cp.add_tap_state(tap_state(1))
    assert not cp.safe_advanced()
    read(cp, 1)
    accept(cp, 2)
    assert not cp.safe_advanced()  # outcomes alone are news, not an advance
    assert not cp.pending_news()
    accept(cp, 1)
    assert cp.safe_advanced()
    cp.take_line()
    assert not cp.safe_advanced()


def test_superseded_states_are_dropped() -> None:
    cp = Checkpointer("run")
    for n in range(1, 101):
        cp.next_seq()
        cp.add_tap_state(tap_state(n % 60))
        cp.add_tap_state(tap_state((n + 1) % 60))  # same tie: replaces the previous one
    assert len(cp._waiting) == 100
    for seq in range(1, 101):
        accept(cp, seq)
    assert len(cp._waiting) == 0
    assert not cp._resolved_ahead


def test_many_records_are_fast_and_memory_stays_bounded() -> None:
    cp = Checkpointer("run")
    for block in range(200):
        seqs = read(cp, 1000)
        cp.add_tap_state(tap_state(block % 60))
        for seq in reversed(seqs):
            accept(cp, seq)
        assert cp.unresolved == 0
        assert not cp._resolved_ahead
        cp.take_line()
    assert cp.totals.accepted == 200_000


# --- property: whatever the order, a line never covers an unresolved record ---------------------

Step = tuple[str, int]


@st.composite
def schedules(draw: st.DrawFn) -> list[Step]:
    """Interleave reads, tap states, resolutions (any order) and take_line calls."""
    total = draw(st.integers(min_value=0, max_value=40))
    steps: list[Step] = []
    read_count = 0
    pending: list[int] = []
    while read_count < total or pending:
        choices = []
        if read_count < total:
            choices += ["read", "state"]
        if pending:
            choices.append("resolve")
        choices.append("take")
        action = draw(st.sampled_from(choices))
        if action == "read":
            read_count += 1
            pending.append(read_count)
            steps.append(("read", read_count))
        elif action == "resolve":
            index = draw(st.integers(min_value=0, max_value=len(pending) - 1))
            steps.append(("resolve", pending.pop(index)))
        else:
            steps.append((action, 0))
    if draw(st.booleans()):
        steps.append(("state", 0))
    steps.append(("take", 0))
    return steps


@settings(max_examples=300, deadline=None)
@given(schedules(), st.integers(min_value=1, max_value=5))
def test_emitted_state_only_covers_resolved_records(steps: list[Step], cap: int) -> None:
    cp = Checkpointer("run", list_cap=cap)
    resolved: set[int] = set()
    ties: list[int] = []  # state index -> number of records read before it
    read_count = 0
    last_emitted = -1
    reported_ops: list[str] = []
    for action, arg in steps:
        if action == "read":
            assert cp.next_seq() == arg
            read_count = arg
        elif action == "state":
            cp.add_tap_state({"bookmarks": {"s": {"i": len(ties)}}, STATE_KEY: "stale"})
            ties.append(read_count)
        elif action == "resolve":
            kind = arg % 4
            if kind == 3:
                cp.resolve_silently(arg)
            elif kind == 0:
                cp.resolve(arg, "s", str(arg), Resolution.DEAD_LETTERED, stage="api")
            elif kind == 1:
                cp.resolve(arg, "s", str(arg), Resolution.ACCEPTED, operation_id=f"op{arg}")
            else:
                cp.resolve(arg, "s", str(arg), Resolution.EXPIRED)
            resolved.add(arg)
        else:
            safe = [
                i for i, tie in enumerate(ties) if all(s in resolved for s in range(1, tie + 1))
            ]
            news = cp.pending_news()
            line = cp.take_line()
            if not safe:
                assert line is None
                assert not news
                continue
            assert line is not None
            index = line["bookmarks"]["s"]["i"]
            # the tap state is tied to a prefix of records all resolved right now ...
            assert all(s in resolved for s in range(1, ties[index] + 1))
            # ... and it is the newest such state, never an older one than before
            assert index == max(safe)
            assert index >= last_emitted
            assert news or (index == last_emitted and not line[STATE_KEY]["operations"])
            last_emitted = index
            own = line[STATE_KEY]
            assert len(own["operations"]) <= cap
            assert len(own["dead_letters"]) <= cap
            reported_ops += [op[1] for op in own["operations"]]
            assert own["totals"]["accepted"] == sum(1 for s in resolved if s % 4 == 1)
            assert own["totals"]["dead_lettered"] == sum(1 for s in resolved if s % 4 == 0)
    assert cp.unresolved == 0
    if ties:
        assert last_emitted == len(ties) - 1  # after everything resolved, the last state is out
    assert len(reported_ops) == len(set(reported_ops))  # nothing reported twice
    assert all(int(key) % 4 == 1 for key in reported_ops)
