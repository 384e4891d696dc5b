"""
Tests for L{smtpgw.rlimits}.

Each case runs in a child process that first sets a low open-file limit (and,
when the tests run as root, optionally drops to C{nobody}), so the limits of
the test process itself are never touched.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

IS_ROOT = os.geteuid() == 0


def _has_cap_sys_resource() -> bool:
    """
    @return: whether this process may raise hard limits (Linux capability
        C{CAP_SYS_RESOURCE}, which containers often drop even for root).
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return IS_ROOT
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return IS_ROOT


CAN_RAISE_HARD_LIMIT = IS_ROOT and _has_cap_sys_resource()

_CHILD = """
import json, os, resource, sys
from twisted.logger import Logger, formatEvent
from smtpgw.rlimits import raise_open_file_limit
soft, hard, drop_to, needed, headroom = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
if drop_to is not None:
    os.setgroups([])
    os.setgid(drop_to[1])
    os.setuid(drop_to[0])
events = []
extra = {} if headroom is None else {"headroom": headroom}
result = raise_open_file_limit(needed, log=Logger(observer=events.append), **extra)
print(json.dumps({
    "result": result,
    "limits": resource.getrlimit(resource.RLIMIT_NOFILE),
    "events": [
        {"level": e["log_level"].name, "text": formatEvent(e), "fields": {
            k: e[k] for k in ("soft", "hard", "target", "needed", "headroom", "old") if k in e
        }}
        for e in events
    ],
}))
"""


def run_child(
    soft: int,
    hard: int,
    needed: int,
    *,
    headroom: int | None = 0,
    unprivileged: bool = False,
) -> dict[str, Any]:
    """
    Run L{raise_open_file_limit} in a child whose limits start at
    C{(soft, hard)}.

    @param headroom: passed on; L{None} leaves the module's default.
    @param unprivileged: drop to C{nobody} first when running as root, so
        the hard limit cannot be raised.
    @return: the result, the limits afterwards and the logged events.
    """
    drop_to = None
    if unprivileged and IS_ROOT:
        nobody = pwd.getpwnam("nobody")
        drop_to = [nobody.pw_uid, nobody.pw_gid]
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([soft, hard, drop_to, needed, headroom])],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def test_raises_soft_limit_to_needed_plus_headroom() -> None:
    """
    A low soft limit is raised to what is needed plus the headroom, not all
    the way to the hard limit; the change is logged at info level.
    """
    outcome = run_child(64, 8192, 1000, headroom=256)
    assert outcome["result"] == 1256
    assert outcome["limits"] == [1256, 8192]
    [event] = outcome["events"]
    assert event["level"] == "info"
    assert event["fields"] == {"old": 64, "soft": 1256}


def test_default_headroom_is_added() -> None:
    """
    Without an explicit headroom the module's default is added.
    """
    from smtpgw.rlimits import DEFAULT_HEADROOM

    outcome = run_child(64, 8192, 100, headroom=None)
    assert outcome["result"] == 100 + DEFAULT_HEADROOM


def test_never_lowers_the_limit() -> None:
    """
    A soft limit already above the target stays as it is, silently.
    """
    outcome = run_child(4000, 8192, 100, headroom=10)
    assert outcome["result"] == 4000
    assert outcome["limits"] == [4000, 8192]
    assert outcome["events"] == []


def test_exactly_at_the_hard_limit_is_enough() -> None:
    """
    A target equal to the hard limit is reached without a warning.
    """
    outcome = run_child(64, 1000, 1000, unprivileged=True)
    assert outcome["result"] == 1000
    assert [e["level"] for e in outcome["events"]] == ["info"]


def test_one_past_the_hard_limit_warns_unprivileged() -> None:
    """
    Unprivileged, one descriptor more than the hard limit allows raises the
    soft limit to the hard limit and logs a warning naming the numbers.
    """
    outcome = run_child(64, 1000, 1001, unprivileged=True)
    assert outcome["result"] == 1000
    assert outcome["limits"] == [1000, 1000]
    [event] = outcome["events"]
    assert event["level"] == "warn"
    assert event["fields"] == {
        "soft": 1000,
        "hard": 1000,
        "target": 1001,
        "needed": 1001,
        "headroom": 0,
    }
    assert "1001 descriptors are wanted" in event["text"]


@pytest.mark.skipif(
    not CAN_RAISE_HARD_LIMIT, reason="raising the hard limit needs root with CAP_SYS_RESOURCE"
)
def test_root_raises_the_hard_limit_too() -> None:
    """
    As root, a hard limit below the target is raised along with the soft one.
    """
    outcome = run_child(64, 512, 3980, headroom=256)
    assert outcome["result"] == 4236
    assert outcome["limits"] == [4236, 4236]
    assert [e["level"] for e in outcome["events"]] == ["info"]


@pytest.mark.skipif(not IS_ROOT, reason="tries to raise the hard limit as root")
def test_root_above_kernel_maximum_falls_back_to_hard_limit() -> None:
    """
    As root, a target above the kernel's maximum (fs.nr_open) cannot be set
    (nor any hard limit without CAP_SYS_RESOURCE); the soft limit still goes
    up to the old hard limit and a warning is logged.
    """
    nr_open_file = Path("/proc/sys/fs/nr_open")
    if not nr_open_file.exists():
        pytest.skip("the kernel's maximum is read from Linux's /proc/sys/fs/nr_open")
    nr_open = int(nr_open_file.read_text())
    outcome = run_child(64, 2048, nr_open + 1)
    assert outcome["result"] == 2048
    assert outcome["limits"] == [2048, 2048]
    assert [e["level"] for e in outcome["events"]] == ["warn"]


def test_test_process_limits_are_untouched() -> None:
    """
    Running the cases above did not change this process's own limits.
    """
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    run_child(64, 1000, 5000, unprivileged=True)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before
