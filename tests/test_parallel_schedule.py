"""Pipeline schedules: every op once in dependency order, the ideal tick count, each schedule's stash."""

import pytest

from jaxlayouts.parallel.schedule import BACKWARD, FORWARD, bubble_fraction, build


@pytest.mark.parametrize("kind, p, v, m", [("gpipe", 4, 1, 8), ("1f1b", 4, 1, 8), ("1f1b", 2, 1, 16),
                                           ("circular", 2, 2, 4), ("circular", 4, 3, 8)])
def test_schedule_runs_every_op_once_in_dependency_order(kind, p, v, m):
    s = build(kind, p, v, m)
    when = {}
    for tick in range(s.ticks):
        for d in range(p):
            if s.op[tick, d] in (FORWARD, BACKWARD):
                key = (int(s.op[tick, d]), int(s.micro[tick, d]), int(s.chunk[tick, d]) * p + d)
                assert key not in when
                when[key] = tick
    last = p * v - 1
    assert len(when) == 2 * m * p * v
    for mb in range(m):
        for j in range(p * v):
            assert j == 0 or when[(FORWARD, mb, j)] > when[(FORWARD, mb, j - 1)]
            after = when[(FORWARD, mb, j)] if j == last else when[(BACKWARD, mb, j + 1)]
            assert when[(BACKWARD, mb, j)] > after
    # No bubble beyond the ideal one: 2 (V M + P - 1) ticks of forward-or-backward.
    assert s.ticks == 2 * (v * m + p - 1)


def test_stash_sizes_show_each_schedules_memory():
    assert build("1f1b", 4, 1, 32).input_slots == 4          # at most P in flight
    assert build("gpipe", 4, 1, 32).input_slots == 32        # every micro-batch
    assert build("circular", 4, 2, 32).input_slots == 64     # every micro-batch and chunk
    assert bubble_fraction("circular", 4, 2, 8) == pytest.approx(3 / 19)
    assert bubble_fraction("1f1b", 4, 2, 8) == pytest.approx(3 / 11)
