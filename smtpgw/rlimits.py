"""
The open-file limit: one descriptor per listening port and per connection.

With the default C{--ports} the gateway holds about 4,000 listening sockets
before the first client connects, far above the usual soft limit of 1,024.
"""

from __future__ import annotations

import os
import resource
import sys

from twisted.logger import Logger

__all__ = ["DEFAULT_HEADROOM", "raise_open_file_limit"]

DEFAULT_HEADROOM = 256
"""Descriptors kept free beyond what the caller asks for: standard streams,
logs, the journal, the database, DNS and outbound sockets."""

# Some systems (macOS) refuse a soft limit above a compiled-in maximum even
# when the hard limit is unlimited; these are tried, highest first, when the
# exact target is refused.
_FALLBACKS = (65536, 10240, 4096)

_log = Logger()


def _finite(limit: int) -> int:
    """
    @return: C{limit}, with "unlimited" as the largest integer.
    """
    return sys.maxsize if limit == resource.RLIM_INFINITY else limit


def _try_setrlimit(soft: int, hard: int) -> bool:
    """
    @return: whether the kernel accepted the limits.
    """
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (OSError, ValueError):
        return False
    return True


def raise_open_file_limit(
    needed: int, *, headroom: int = DEFAULT_HEADROOM, log: Logger = _log
) -> int:
    """
    Raise the soft C{RLIMIT_NOFILE} of this process to fit C{needed}
    descriptors plus C{headroom}; never lower it.

    The soft limit goes up to the hard limit; when running as root the hard
    limit is raised too if it is in the way (which fails without
    C{CAP_SYS_RESOURCE} or above the kernel's C{fs.nr_open}; the old hard
    limit is then the ceiling).

    @param needed: descriptors the caller will hold, e.g. one per port.
    @param headroom: extra descriptors for everything else.
    @param log: where to report the change, or the shortfall as a warning.
    @return: the soft limit now in force (C{sys.maxsize} for unlimited).
    """
    target = needed + headroom
    original_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _finite(original_soft) >= target:
        return _finite(original_soft)
    if _finite(hard) < target and os.geteuid() == 0 and _try_setrlimit(target, target):
        hard = target
    ceiling = min(target, _finite(hard))
    for candidate in (ceiling, *(n for n in _FALLBACKS if n < ceiling)):
        if candidate <= _finite(original_soft) or _try_setrlimit(candidate, hard):
            break
    soft = _finite(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if soft < target:
        log.warn(
            "open-file limit is {soft} (hard limit {hard}) but {target} descriptors are"
            " wanted ({needed} needed + {headroom} headroom); raise the hard limit"
            " (ulimit -Hn, LimitNOFILE=) or listen on fewer ports",
            soft=soft,
            hard=_finite(hard),
            target=target,
            needed=needed,
            headroom=headroom,
        )
    elif soft != original_soft:
        log.info(
            "raised open-file limit from {old} to {soft}",
            old=original_soft,
            soft=soft,
        )
    return soft
