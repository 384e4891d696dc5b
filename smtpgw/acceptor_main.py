"""
An acceptor process (see L{smtpgw.acceptors}): started by the main process
as C{python -m smtpgw.acceptor_main CONFIG}, never by hand.

It finds the listening sockets at file descriptors 3 and up
(C{SMTPGW_ACCEPTOR_FDS} of them), its channel to the main process on stdin
and stdout (stdout is moved to a private descriptor at once, and descriptor
1 pointed at stderr, so that nothing printed can break the channel), and
writes its log events to stderr, one JSON object a line, for the main
process to log. It reads no certificate file: the main process sends the
certificate and key it loaded (as root, if it started as root), and sends
them again after each reload.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, TextIO

import attrs

from smtpgw.acceptors import (
    STOP_GRACE,
    AcceptorConfig,
    MainLink,
    PipeWriter,
)
from smtpgw.processes import parent_death_signal


def _observer(stream: TextIO) -> Any:
    from twisted.logger import eventAsText

    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        try:
            stream.write(
                json.dumps({"level": getattr(level, "name", "info"), "text": text}) + "\n"
            )
            stream.flush()
        except (OSError, ValueError):
            pass

    return observe


def main(argv: list[str] | None = None) -> int:
    """
    Serve SMTP on the inherited sockets until told to stop (C{SIGTERM}) or
    the main process is gone.
    """
    argv = sys.argv if argv is None else argv
    parent_death_signal(int(os.environ["SMTPGW_ACCEPTOR_PARENT"]))
    # Ctrl-C reaches the whole process group: the main process stops us.
    # Certificates come over the channel: SIGHUP is for the main process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel_out = os.dup(1)
    os.dup2(2, 1)
    config = AcceptorConfig.from_json(argv[1])
    count = int(os.environ["SMTPGW_ACCEPTOR_FDS"])

    # Before anything imports the default reactor: replies go out before
    # the reactor next waits (see smtpgw.promptwrites).
    from smtpgw.promptwrites import install

    install()

    from twisted.cred.portal import Portal
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.stdio import StandardIO
    from twisted.logger import Logger, globalLogBeginner

    from smtpgw.checker import BcryptPool, SmtpUserChecker
    from smtpgw.database import database_path
    from smtpgw.listening import accept_taking_turns
    from smtpgw.model import QueueIdGenerator
    from smtpgw.realm import GatewayRealm
    from smtpgw.services import OrderedMultiService
    from smtpgw.session import GatewaySMTPFactory
    from smtpgw.tls import TLSConfigError, tls_options_from_pem
    from smtpgw.userstore import ThreadedUserStore

    reactor: Any = _reactor
    globalLogBeginner.beginLoggingTo([_observer(sys.stderr)], redirectStandardIO=False)
    log = Logger()

    top = OrderedMultiService()
    users = ThreadedUserStore(database_path(config.data_dir), reactor=reactor, clock=reactor)
    users.setServiceParent(top)
    bcrypt = BcryptPool(reactor)
    bcrypt.setServiceParent(top)
    stopping: list[bool] = []

    def stop(why: str) -> None:
        # SIGTERM, the end of the channel, or both (a whole process group
        # told to stop): stop once.
        if not stopping:
            stopping.append(True)
            log.info("stopping: {why}", why=why)
            reactor.stop()

    tls: list[Any] = []
    ports: list[Any] = []

    def got_tls(cert: bytes, key: bytes, cert_path: str, key_path: str) -> None:
        if not cert:
            # The main process offers no STARTTLS.
            if not ports:
                listen()
            return
        try:
            options = tls_options_from_pem(cert, key, cert_path=cert_path, key_path=key_path)
        except TLSConfigError as error:
            log.error("TLS certificate refused, keeping the previous one: {why}", why=str(error))
            return
        first = not tls
        tls[:] = [options]
        if first:
            listen()
        else:
            log.info("TLS certificate reloaded from {path}", path=cert_path)

    # Frames go out through a writer of their own, at once; StandardIO
    # reads the channel and notices when the main process closes it.
    out = PipeWriter(reactor, os.dup(channel_out))
    link = MainLink(config.limits, lambda: stop("the main process is gone"), got_tls, out=out)
    # (mypy sees the Windows StandardIO, which has no stdout argument.)
    StandardIO(link, stdout=channel_out, reactor=reactor)  # type: ignore[call-arg]
    factory = GatewaySMTPFactory(
        portal=Portal(
            GatewayRealm(),
            [SmtpUserChecker(users, reactor, bcrypt=bcrypt, changes=users.change_token)],
        ),
        queue=link,
        alerts=link,
        users=users,
        hostname=config.hostname,
        # The main process holds back repeated sender alerts, for all.
        limits=attrs.evolve(config.limits, sender_alert_window=0.0),
        tls=lambda: tls[0] if tls else None,
        require_tls=config.require_tls,
        clock=reactor,
        queue_ids=QueueIdGenerator(),
        metrics=link,
        # A sole acceptor counts connections and failed logins itself:
        # no round trip to the main process before each greeting and login.
        connection_limiter=None if config.alone else link,
        auth_limiter=None if config.alone else link,
        log_accepted=False,
    )
    link.in_data = lambda: factory.in_data
    top.startService()

    def listen() -> None:
        # Once the certificate has come: no session without STARTTLS.
        for fd in range(3, 3 + count):
            ports.append(accept_taking_turns(reactor, fd, factory, alone=config.alone))
            os.close(fd)
        link.ready(len(ports))

    def drain() -> Deferred[None]:
        # Stop accepting, then give the messages under way their answers.
        for port in ports:
            port.stopListening()
        done: Deferred[None] = Deferred()
        deadline = reactor.seconds() + STOP_GRACE

        def check() -> None:
            if link.in_flight == 0 or reactor.seconds() >= deadline:
                done.callback(None)
            else:
                reactor.callLater(0.02, check)

        check()
        return done.addCallback(lambda _: top.stopService())

    reactor.addSystemEventTrigger("before", "shutdown", drain)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stop, "SIGTERM"))
    profile = os.environ.get("SMTPGW_ACCEPTOR_PROFILE")
    if profile:
        # For benchmarks: where this process spends its time (cProfile).
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(reactor.run, installSignalHandlers=False)
        profiler.dump_stats(f"{profile}-{os.environ.get('SMTPGW_ACCEPTOR_INDEX', '0')}.prof")
    else:
        reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
