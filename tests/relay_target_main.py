"""
Run the test relay target (L{tests.relay_target.RelayTarget}, a real
Twisted ESMTP server) as its own process on 127.0.0.1, for end-to-end tests
of the gateway's relaying: each message it takes is appended as one JSON
line (sender, recipients, data in latin-1, over_tls, and received_at: the
target's clock, in seconds since the epoch, when it took the final dot) to
the given file, in the order taken; a message it takes back (refused at the final dot) is
followed by a C{{"retract": true}} line. It prints C{PORT <n>} once it listens.

    python -m tests.relay_target_main OUTPUT.jsonl [--port N] [--eom-reply 451]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import react

from tests.relay_target import Received, RelayTarget, Script, make_tls


class _Appending(list[Received]):
    """
    The target's list of received messages, also written to a file.
    """

    def __init__(self, path: str, clock: IReactorTime) -> None:
        super().__init__()
        self._path = path
        self._clock = clock

    def append(self, received: Received) -> None:
        super().append(received)
        self._write(_line(received, self._clock.seconds()))

    def pop(self, index: Any = -1) -> Received:
        # The target takes back the last message when it then refuses it at
        # the final dot: readers drop the entry before a retraction.
        assert index == -1
        taken = super().pop()
        self._write(json.dumps({"retract": True}) + "\n")
        return taken

    def _write(self, line: str) -> None:
        with open(self._path, "a") as out:
            out.write(line)


def _line(received: Received, received_at: float) -> str:
    return (
        json.dumps(
            {
                "sender": received.sender,
                "recipients": received.recipients,
                "data": received.data.decode("latin-1"),
                "over_tls": received.over_tls,
                "received_at": received_at,
            }
        )
        + "\n"
    )


def main(reactor: Any, argv: list[str]) -> Deferred[None]:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--eom-reply", type=int, default=None)
    args = parser.parse_args(argv)
    script = Script(tls=make_tls(), pipelining=True)
    if args.eom_reply is not None:
        script = Script(
            tls=script.tls, pipelining=True, eom_reply=(args.eom_reply, "scripted reply")
        )
    target = RelayTarget(script)
    target.received = _Appending(args.output, reactor)
    port = reactor.listenTCP(args.port, target, interface="127.0.0.1")
    print(f"PORT {port.getHost().port}", flush=True)
    return Deferred()  # runs until killed


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
