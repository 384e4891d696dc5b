"""
What the gateway's helper processes share (standard library only: the
privileged key reader imports nothing else).
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["parent_death_signal"]


def parent_death_signal(parent: int) -> None:
    """
    Make the kernel kill this process when the process C{parent} (that
    started it) ends; exit at once if it already has.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
