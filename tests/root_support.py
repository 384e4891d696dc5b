"""
Tests that need root: they skip without it on a developer's machine, and
fail when C{CI=true}, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os

import pytest


def need_root(reason: str) -> None:
    """
    Return when running as root; otherwise skip the test with C{reason},
    or fail it when C{CI=true}.
    """
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires this test to run")
    pytest.skip(reason)
