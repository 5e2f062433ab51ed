"""The stage timeline's data: merged busy bars, busy shares, and per-window throughput."""

import pytest

from persd_online.timeline import busy_share, stage_bars, throughput

T0 = 1_000_000.0


def test_overlapping_turns_of_a_stage_draw_as_one_bar():
    intervals = [{"stage": "teacher", "start": T0 + 0, "end": T0 + 30},
                 {"stage": "teacher", "start": T0 + 10, "end": T0 + 60},  # a second refiner, concurrently
                 {"stage": "teacher", "start": T0 + 120, "end": T0 + 150},
                 {"stage": "trainer", "start": T0 + 60, "end": T0 + 90}]
    bars = stage_bars(intervals, T0)
    assert bars["teacher"] == [(0.0, 1.0), (2.0, 0.5)]
    assert bars["trainer"] == [(1.0, 0.5)]
    assert busy_share(bars, 3.0) == {"teacher": 0.5, "trainer": pytest.approx(1 / 6)}


def test_throughput_windows_add_up_to_the_counters_increase():
    # attempts: 0 at t=0, 30 at t=60, 30 at t=120, 90 at t=150 (snapshots every 30 s)
    snaps = [{"t": T0 + 30 * i, "attempts": a} for i, a in enumerate([0, 10, 30, 30, 30, 90])]
    rates = throughput(snaps, T0, window_s=60)["attempts"]
    assert [m for m, _ in rates] == [0.5, 1.5, 2.25]  # minutes 0-1, 1-2, and the short last window 2-2.5
    assert [r for _, r in rates] == [30.0, 0.0, 120.0]
    assert sum(r * w for (_, r), w in zip(rates, [1, 1, 0.5], strict=True)) == 90


def test_throughput_skips_missing_counters_and_needs_two_snapshots():
    assert throughput([{"t": T0, "attempts": 1}], T0) == {}
    assert set(throughput([{"t": T0, "attempts": 0}, {"t": T0 + 60, "attempts": 6}], T0)) == {"attempts"}
