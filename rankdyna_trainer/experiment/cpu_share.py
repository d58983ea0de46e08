"""Whether a timed run had the machine to itself: this process's CPU time over the machine's busy CPU time.

A wall time is only comparable with another when neither run shared the cores. Notes written by hand after the fact
(``notes.json``) catch the contention someone remembered; this measures it for every run. Linux only (``/proc/stat``);
elsewhere the share is ``None`` and nothing is concluded.
"""

from __future__ import annotations

import os

# Below this share another job took enough of the cores to move a 2-core wall time by more than a few percent.
SHARED_BELOW = 0.9


def _machine_busy_ticks() -> int | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10])  # guest time is already counted in user / nice
    return sum(fields) - idle - guest


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuShare:
    """Start at construction, read with ``share()``: the fraction of the machine's busy CPU time since then that
    was this process's (and its children's). 1.0 is a run alone on the machine; 0.5 is one that split the cores
    with an equal job."""

    def __init__(self):
        self._busy = _machine_busy_ticks()
        self._own = _own_seconds()

    def share(self) -> float | None:
        busy = _machine_busy_ticks()
        if busy is None or self._busy is None:
            return None
        busy_s = (busy - self._busy) / os.sysconf("SC_CLK_TCK")
        if busy_s <= 0:
            return None
        return min(1.0, (_own_seconds() - self._own) / busy_s)


def shared_machine(share: float | None) -> bool:
    """True when a measured share says another job used the cores (an unmeasured one says nothing)."""
    return share is not None and share < SHARED_BELOW
