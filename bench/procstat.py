"""
CPU accounting from C{/proc}: a process tree's CPU time and the machine's.

A server under test may be many processes (Postfix's master, smtpd, cleanup,
qmgr...) that come and go. The CPU of a tree is its live members' user and
system time plus what they have collected from children already reaped
(C{cutime}/C{cstime}), so a child that ends during a measurement is still
counted once, through its parent.
"""

from __future__ import annotations

import os
from pathlib import Path

from attrs import frozen

_TICKS = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


@frozen
class _Stat:
    pid: int
    ppid: int
    own: int
    children: int


def _read_stat(pid: int) -> _Stat | None:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces.
    fields = text[text.rindex(")") + 2 :].split()
    return _Stat(
        pid=pid,
        ppid=int(fields[1]),
        own=int(fields[11]) + int(fields[12]),
        children=int(fields[13]) + int(fields[14]),
    )


def _all_stats() -> list[_Stat]:
    stats = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                stats.append(stat)
    return stats


def tree_cpu_seconds(root: int) -> float:
    """
    @param root: the pid at the top of the tree.
    @return: CPU seconds (user + system) used so far by C{root} and all its
        descendants, live or reaped; 0 when C{root} is gone.
    """
    stats = _all_stats()
    children: dict[int, list[_Stat]] = {}
    by_pid = {}
    for stat in stats:
        children.setdefault(stat.ppid, []).append(stat)
        by_pid[stat.pid] = stat
    top = by_pid.get(root)
    if top is None:
        return 0.0
    total = 0
    pending = [top]
    while pending:
        stat = pending.pop()
        total += stat.own + stat.children
        pending.extend(children.get(stat.pid, ()))
    return total / _TICKS


@frozen
class MachineCpu:
    """
    The machine's CPU counters at one moment, in seconds summed over CPUs.

    @ivar busy: time not idle.
    @ivar total: all time.
    @ivar steal: time the hypervisor gave to other machines (part of
        C{busy}): a virtual machine's neighbours show up here.
    """

    busy: float
    total: float
    steal: float = 0.0

    @classmethod
    def now(cls) -> MachineCpu:
        """
        @return: the counters of C{/proc/stat} now.
        """
        first = (_PROC / "stat").read_text().split("\n", 1)[0].split()
        values = [int(value) for value in first[1:9]]
        idle = values[3] + values[4]
        return cls(
            busy=(sum(values) - idle) / _TICKS,
            total=sum(values) / _TICKS,
            steal=values[7] / _TICKS,
        )


def cpu_count() -> int:
    """
    @return: the CPUs this process may run on.
    """
    return len(os.sched_getaffinity(0))
