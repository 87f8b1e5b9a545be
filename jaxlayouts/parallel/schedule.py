"""Pipeline schedules as tables: which device runs which forward or backward op at each tick.

``P`` devices (the ``pp`` axis) hold ``V`` chunks each, virtual stage ``j = v * P + d`` on device
``d`` (layers assigned round-robin, Narayanan et al. 2021). A micro-batch's forward runs through
virtual stages ``0 .. P*V-1`` and its backward back again; an activation crosses to the next
device (a ring: the last device hands chunk ``v`` to device 0's chunk ``v + 1``) in one tick.

* ``gpipe`` (Huang et al. 2019): every forward, then every backward; all ``M`` micro-batches'
  stage inputs are alive at the turn.
* ``circular``: GPipe over ``V`` chunks per device, micro-batches entering in groups of ``P``;
  the bubble shrinks by ``V``.
* ``1f1b`` (PipeDream-Flush, Narayanan et al. 2021): device ``d`` runs ``P - d - 1`` warm-up
  forwards, then alternates one forward and one backward; at most ``P - d`` micro-batches are in
  flight on device ``d``, whatever ``M`` is.

A table is built by simulating each device's op order tick by tick (an op runs once its inputs
arrived); buffer slots for stashed stage inputs and received gradients are allocated in the same
simulation, so the stash size is the schedule's real activation footprint.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IDLE, FORWARD, BACKWARD = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per tick and device (arrays ``[ticks, P]``): the op, its micro-batch and chunk, the stash
    slot of its stage input and of its incoming gradient, and where to store this tick's
    received activation / gradient (-1: nothing to store)."""

    op: np.ndarray
    micro: np.ndarray
    chunk: np.ndarray
    input_slot: np.ndarray
    grad_slot: np.ndarray
    store_activation: np.ndarray
    store_grad: np.ndarray
    input_slots: int
    grad_slots: int

    @property
    def ticks(self) -> int:
        return self.op.shape[0]


def ideal_ticks(kind: str, stages: int, virtual_stages: int, microbatches: int) -> int:
    """Chunk-times one pass (forward or backward) of an ideal pipeline takes on a device:
    V * M + P - 1 (Narayanan et al. 2021; V = 1 for gpipe and 1f1b). ``build`` runs twice that."""
    v = virtual_stages if kind == "circular" else 1
    return v * microbatches + stages - 1


def bubble_fraction(kind: str, stages: int, virtual_stages: int, microbatches: int) -> float:
    """Idle fraction of an ideal pipeline: (P - 1) / (V * M + P - 1)."""
    return (stages - 1) / ideal_ticks(kind, stages, virtual_stages, microbatches)


def _op_orders(kind: str, p: int, v: int, m: int) -> list[list[tuple]]:
    """Each device's ops in the order it runs them: ("F" | "B", micro-batch, virtual stage)."""
    orders = []
    for d in range(p):
        if kind == "1f1b":
            warmup = min(p - d - 1, m)
            ops = [("F", i, d) for i in range(warmup)]
            for i in range(m - warmup):
                ops += [("F", warmup + i, d), ("B", i, d)]
            ops += [("B", i, d) for i in range(m - warmup, m)]
        else:
            forwards = [("F", g * p + i, c * p + d)
                        for g in range(-(-m // p)) for c in range(v) for i in range(p) if g * p + i < m]
            ops = forwards + [("B", mb, j) for _, mb, j in reversed(forwards)]
        orders.append(ops)
    return orders


class _Slots:
    def __init__(self):
        self.free: list[int] = []
        self.size = 0

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        self.size += 1
        return self.size - 1


def build(kind: str, stages: int, virtual_stages: int, microbatches: int) -> Schedule:
    p, v, m = stages, virtual_stages, microbatches
    last = p * v - 1
    orders = _op_orders(kind, p, v, m)
    position = [0] * p
    done: dict[tuple, int] = {}  # op -> tick it ran
    input_slot: dict[tuple, int] = {}  # (micro, stage) -> slot on its device
    grad_slot: dict[tuple, int] = {}
    slots = [(_Slots(), _Slots()) for _ in range(p)]
    rows, tick, sent = [], 0, []
    total = sum(len(o) for o in orders)
    while len(done) < total:
        row = {key: [-1] * p for key in ("op", "micro", "chunk", "input_slot", "grad_slot",
                                         "store_activation", "store_grad")}
        row["op"] = [IDLE] * p
        # 1. messages sent last tick arrive: stash them.
        for kind_, mb, j in sent:
            if kind_ == "F" and j < last:
                d = (j + 1) % p
                input_slot[(mb, j + 1)] = row["store_activation"][d] = slots[d][0].take()
            if kind_ == "B" and j > 0:
                d = (j - 1) % p
                grad_slot[(mb, j - 1)] = row["store_grad"][d] = slots[d][1].take()
        # 2. every device runs its next op if its inputs have arrived.
        freed, sent = [], []
        for d in range(p):
            if position[d] == len(orders[d]):
                continue
            kind_, mb, j = orders[d][position[d]]
            if kind_ == "F":
                ready = j == 0 or done.get(("F", mb, j - 1), tick) < tick
                if ready and j == 0:
                    input_slot[(mb, 0)] = slots[d][0].take()
            else:
                ready = done.get(("F", mb, j), tick) < tick and (j == last or done.get(("B", mb, j + 1), tick) < tick)
            if not ready:
                continue
            row["op"][d] = FORWARD if kind_ == "F" else BACKWARD
            row["micro"][d], row["chunk"][d] = mb, j // p
            row["input_slot"][d] = input_slot[(mb, j)]
            if kind_ == "B":
                freed.append((d, 0, input_slot[(mb, j)]))
                if j < last:
                    row["grad_slot"][d] = grad_slot[(mb, j)]
                    freed.append((d, 1, grad_slot[(mb, j)]))
            done[(kind_, mb, j)] = tick
            sent.append((kind_, mb, j))
            position[d] += 1
        for d, which, slot in freed:  # reusable from the next tick on
            slots[d][which].free.append(slot)
        rows.append(row)
        tick += 1
        if tick > 4 * (total + p):
            raise RuntimeError(f"pipeline schedule {kind} did not finish (P={p}, V={v}, M={m})")
    table = {key: np.array([r[key] for r in rows], np.int32) for key in rows[0]}
    return Schedule(**table, input_slots=max(s[0].size for s in slots),
                    grad_slots=max(1, max(s[1].size for s in slots)))
