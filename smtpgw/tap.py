"""
The twistd plugin's options and service wiring.

This is the only module that turns option strings into objects and wires the
parts of the gateway together.
"""

from __future__ import annotations

import os
import random
import socket
import stat
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import IService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from smtpgw.limits import Limits
from smtpgw.ports import PortSpecError, parse_ports

DEFAULT_PORTS = "23,25,26,587,1025-5000"
DEFAULT_MAX_SIZE = 25 * 1024 * 1024
DEFAULT_ADMIN = "tcp:8080:interface=127.0.0.1"

log = Logger()


def _positive_int(name: str, text: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"--{name} must be a whole number, not {text!r}") from None
    if value < minimum:
        raise usage.UsageError(f"--{name} must be at least {minimum}, not {value}")
    return value


def _size(name: str, text: str) -> int:
    """
    Parse a byte count with an optional K/M/G suffix (powers of 1024).
    """
    multipliers = {"k": 1024, "m": 1024**2, "g": 1024**3}
    stripped = text.strip().lower().removesuffix("b")
    factor = 1
    if stripped and stripped[-1] in multipliers:
        factor = multipliers[stripped[-1]]
        stripped = stripped[:-1]
    return _positive_int(name, stripped, minimum=1) * factor


#: The session limits settable from the command line: kind, and help text.
LIMIT_OPTIONS: dict[str, tuple[str, str]] = {
    "max_size": ("size", "Largest message, in octets as SIZE counts (K/M/G suffixes)."),
    "max_recipients": ("int", "Recipients per message; the next gets 452 4.5.3."),
    "max_command_length": ("int", "Longest command line with CRLF; longer gets 500 5.5.2."),
    "max_path_length": ("int", "Longest MAIL/RCPT path; longer gets 501 5.1.3."),
    "max_data_line_length": ("int", "Longest message line; longer refuses and disconnects."),
    "idle_timeout": ("seconds", "Silence allowed before 421 4.4.2."),
    "command_deadline": ("seconds", "Time one command line may take, however it trickles."),
    "data_deadline": ("seconds", "Time the whole DATA section may take."),
    "max_connections": ("int", "Simultaneous connections in all; the next gets 421 4.7.0."),
    "max_connections_per_ip": (
        "int",
        "Simultaneous connections from one address (IPv6: per /64).",
    ),
    "max_bad_commands": ("int", "Protocol errors allowed before 421 4.7.0."),
    "auth_failure_limit": (
        "int",
        "Failed logins per address (IPv6: per /64) within the window before 421.",
    ),
    "auth_failure_window": ("seconds", "Window over which failed logins are counted."),
    "auth_failure_delay": ("seconds", "Tarpit step: the n-th failed login waits n times this."),
    "auth_failure_delay_cap": ("seconds", "Longest tarpit delay."),
    "greet_delay": ("seconds", "Wait before the greeting; talking early gets 554 (0: off)."),
    "max_junk_commands": (
        "int",
        "Commands that move no mail (NOOP, RSET, HELP, EHLO...) before 421 4.7.0.",
    ),
    "max_messages_per_session": ("int", "Messages per connection; the next MAIL gets 421 4.7.0."),
    "max_session_seconds": ("seconds", "Longest session; then 421 4.7.0 between messages."),
    "user_recheck_interval": (
        "seconds",
        "Re-read a logged-in user's record at MAIL after this long (0: every MAIL).",
    ),
    "sender_alert_window": (
        "seconds",
        "Store a repeated sender alert once per user and address per window, then a count.",
    ),
}


def _option(name: str) -> str:
    return name.replace("_", "-")


class Options(usage.Options):
    """
    Command-line options of C{twistd smtpgw}.
    """

    synopsis = "[options]"
    longdesc = (
        "An authenticated SMTP relay gateway: it checks who may send as whom, "
        "keeps every accepted message in a durable journal and sends it on in "
        "priority order. All state lives under --data-dir."
    )

    optFlags = [
        ["require-tls", None, "Offer AUTH only after STARTTLS."],
    ]

    optParameters = [
        ["data-dir", "d", "./smtpgw-data", "Directory holding all state."],
        ["ports", "p", DEFAULT_PORTS, "SMTP ports to listen on: a list of ports and ranges."],
        ["interface", "i", "0.0.0.0", "Address the SMTP ports listen on."],
        ["hostname", None, None, "Name the gateway uses in its greeting and headers."],
        ["tls-cert", None, None, "PEM certificate (chain) for STARTTLS."],
        ["tls-key", None, None, "PEM private key for STARTTLS."],
        [
            "relay",
            None,
            "mx",
            "Where mail goes: 'mx', 'smtp://host:port', 'capture' (into the data dir)"
            " or 'discard' (nowhere: benchmarks, dry runs).",
        ],
        ["rate", None, "0", "Messages per second for the whole gateway (0: unlimited)."],
        ["concurrency", None, "20", "Deliveries at once."],
        [
            "max-queue-age",
            None,
            "432000",
            "Seconds a message may keep failing temporarily before it bounces (5.4.7).",
        ],
        [
            "admin",
            None,
            DEFAULT_ADMIN,
            "Where the admin pages and API listen (a Twisted endpoint; 'none': off).",
        ],
        [
            "preemption-grace",
            None,
            "0.05",
            "Seconds console sends stay paused after the last higher-priority message.",
        ],
        [
            "public-url",
            None,
            None,
            "The admin app's URL as mail recipients reach it (unsubscribe links).",
        ],
        [
            "acceptors",
            None,
            "auto",
            "Processes answering SMTP beside the main one ('auto': one per core but one,"
            " which the main process keeps; 0: none, the main process answers).",
        ],
        *[[_option(name), None, None, text] for name, (_, text) in LIMIT_OPTIONS.items()],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name, (_, text) in LIMIT_OPTIONS.items():
            default = getattr(Limits(), name)
            if name == "max_size":
                default = DEFAULT_MAX_SIZE
            self.docs[_option(name)] = f"{text} [default: {default}]"

    def postOptions(self) -> None:
        self["ports-text"] = self["ports"]
        try:
            self["ports"] = parse_ports(self["ports"])
        except PortSpecError as e:
            raise usage.UsageError(f"--ports: {e}") from None
        try:
            rate = float(self["rate"])
        except ValueError:
            raise usage.UsageError(f"--rate must be a number, not {self['rate']!r}") from None
        if rate < 0 or rate != rate:
            raise usage.UsageError("--rate must be 0 (unlimited) or more")
        self["rate"] = rate
        self["concurrency"] = _positive_int("concurrency", self["concurrency"])
        try:
            self["max-queue-age"] = float(self["max-queue-age"])
        except ValueError:
            raise usage.UsageError("--max-queue-age must be a number of seconds") from None
        if not self["max-queue-age"] > 0:
            raise usage.UsageError("--max-queue-age must be more than 0 seconds")
        self["limits"] = self._limits()
        self["acceptors"] = _acceptors(self["acceptors"])
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        relay = self["relay"]
        if relay not in ("mx", "capture", "discard") and not relay.startswith("smtp://"):
            raise usage.UsageError(
                f"--relay must be 'mx', 'capture', 'discard' or 'smtp://host:port', not {relay!r}"
            )
        if relay.startswith("smtp://"):
            from smtpgw.relay import RelayURLError, parse_relay_url

            try:
                self["relay-url"] = parse_relay_url(relay)
            except RelayURLError as e:
                # The message never contains the password.
                raise usage.UsageError(f"--relay: {e}") from None

        if self["hostname"] is None:
            self["hostname"] = socket.getfqdn()
        if self["admin"].strip().lower() == "none":
            self["admin"] = None
        if self["public-url"] is None:
            guessed = _default_public_url(self["admin"], self["hostname"])
            if guessed is None:
                raise usage.UsageError(
                    "--public-url is needed when --admin has no TCP or TLS port: "
                    "console sends link to the gateway's unsubscribe page"
                )
            self["public-url"] = guessed
        try:
            self["preemption-grace"] = float(self["preemption-grace"])
        except ValueError:
            raise usage.UsageError("--preemption-grace must be a number of seconds") from None
        if not 0 <= self["preemption-grace"] <= 3600:
            raise usage.UsageError("--preemption-grace must be between 0 and 3600 seconds")

    def _limits(self) -> Limits:
        changes: dict[str, Any] = {"max_size": DEFAULT_MAX_SIZE}
        for name, (kind, _) in LIMIT_OPTIONS.items():
            text = self[_option(name)]
            if text is None:
                continue
            option = _option(name)
            if kind == "size":
                changes[name] = _size(option, text)
            elif kind == "int":
                changes[name] = _positive_int(option, text, minimum=0)
            else:
                try:
                    changes[name] = float(text)
                except ValueError:
                    raise usage.UsageError(f"--{option} must be a number of seconds") from None
        try:
            return Limits(**changes)
        except (TypeError, ValueError) as e:
            raise usage.UsageError(str(e).replace("_", "-")) from None


def _endpoint_fields(description: str) -> tuple[list[str], dict[str, str]]:
    """
    The positional and keyword fields of a Twisted endpoint description
    (C{tcp:8080:interface=127.0.0.1}), with C{\\:} escapes honoured.
    """
    fields: list[str] = []
    current = ""
    escaped = False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(current)
            current = ""
        else:
            current += char
    fields.append(current)
    positional = [f for f in fields if "=" not in f]
    keywords = dict(f.split("=", 1) for f in fields if "=" in f)
    return positional, keywords


def _default_public_url(admin: str | None, hostname: str) -> str | None:
    """
    The admin app's URL when C{--public-url} is not given: its TCP or TLS
    port on the gateway's name; L{None} when the admin app has no such port
    (off, or on a UNIX socket behind a proxy), so no link can be guessed.
    """
    if admin is None:
        return None
    positional, keywords = _endpoint_fields(admin)
    kind = positional[0].lower() if positional else ""
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    port = keywords.get("port") or (positional[1] if len(positional) > 1 else "")
    if not port.isdigit():
        return None
    scheme = "https" if kind == "ssl" else "http"
    default = {"http": "80", "https": "443"}[scheme]
    return f"{scheme}://{hostname}" + ("" if port == default else f":{port}")


#: The most acceptor processes C{--acceptors} may ask for.
MAX_ACCEPTORS = 64


def _acceptors(text: str) -> int:
    if text.strip().lower() == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        # The main process (journal, queue, deliveries) keeps a core busy
        # under load: measured on 2 cores, one acceptor beside it accepted
        # 1-35 % more than two.
        cores = cores or os.cpu_count() or 1
        return min(cores - 1, MAX_ACCEPTORS)
    count = _positive_int("acceptors", text, minimum=0)
    if count > MAX_ACCEPTORS:
        raise usage.UsageError(f"--acceptors must be at most {MAX_ACCEPTORS}, not {count}")
    return count


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _outbound(options: Options, data_dir: FilePath[str], reactor: Any) -> IService:
    from smtpgw.outbound import CaptureOutbound, DiscardOutbound
    from smtpgw.relay import SmarthostOutbound
    from smtpgw.smtpclient import ClientSettings

    if options["relay"] == "capture":
        return CaptureOutbound(data_dir.path, reactor)
    if options["relay"] == "discard":
        return DiscardOutbound()
    if options["relay"] == "mx":
        from twisted.names.client import createResolver

        from smtpgw.mx import MXResolver
        from smtpgw.mxoutbound import MXOutbound

        return MXOutbound(
            reactor,
            MXResolver(createResolver(), reactor),
            settings=ClientSettings(helo_name=options["hostname"]),
            max_connections=options["concurrency"],
        )
    return SmarthostOutbound.from_url(
        reactor,
        options["relay-url"],
        # The name this gateway gives in EHLO: receiving servers check it.
        settings=ClientSettings(helo_name=options["hostname"]),
        max_connections=options["concurrency"],
    )


def _run_as(options: Options) -> tuple[int, int] | None:
    """
    The uid and gid twistd will switch to after binding (C{--uid/--gid}),
    when it runs as root and will switch.
    """
    import pwd

    parent = getattr(options, "parent", None)
    if parent is None or os.getuid() != 0:
        return None
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is None:
        return None
    if gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    return int(uid), int(gid)


#: The state files, by directory, that the gateway itself writes.
_STATE_FILES = {
    "": ("smtpgw.db", "smtpgw.db-wal", "smtpgw.db-shm"),
    "captured": ("index.jsonl",),
    "tls": ("selfsigned.crt", "selfsigned.key"),
}


def _hand_over(data_dir: FilePath[str], owner: tuple[int, int]) -> None:
    """
    Give the data directory and the state files in it to the user twistd
    drops to, so the gateway can still write them after shedding root.

    This runs as root on a directory the service user has owned since the
    first start: nothing is followed through a symbolic link (a link is left
    alone, and a linked directory is not entered), so that user cannot have
    root give it files elsewhere. Captured messages are left alone too:
    there may be very many, and the gateway only ever adds new ones.
    """
    uid, gid = owner

    def chown(path: str) -> None:
        os.chown(path, uid, gid, follow_symlinks=False)

    chown(data_dir.path)
    for name in ("", "captured", "journal", "tls"):
        directory = os.path.join(data_dir.path, name) if name else data_dir.path
        if name:
            if not _is_real(directory, stat.S_ISDIR):
                continue
            chown(directory)
        if name == "journal":
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        chown(entry.path)
            continue
        for file_name in _STATE_FILES[name]:
            path = os.path.join(directory, file_name)
            if _is_real(path, stat.S_ISREG):
                chown(path)


def _is_real(path: str, kind: Any) -> bool:
    """
    Whether C{path} exists as that kind of file itself, not through a link.
    """
    try:
        return bool(kind(os.lstat(path).st_mode))
    except FileNotFoundError:
        return False


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the gateway: user store, alerts, journal, queue, outbound, TLS and
    the SMTP listeners, as one L{MultiService}. Children start in the order
    they are added and stop in reverse: the listeners close first, the
    queue lets deliveries under way finish, the journal flushes last.
    """
    from smtpgw.alerts import SQLiteAlertStore
    from smtpgw.campaigns import CampaignRunner, ThreadedCampaignStore, campaign_gate
    from smtpgw.checker import BcryptPool, SmtpUserChecker
    from smtpgw.control import ControlService, QueueControl
    from smtpgw.database import database_path
    from smtpgw.journal import FileJournal
    from smtpgw.listening import MultiPortListener
    from smtpgw.metrics import GatewayMetrics
    from smtpgw.model import QueueIdGenerator
    from smtpgw.queue import MessageQueue
    from smtpgw.realm import GatewayRealm
    from smtpgw.recipients import ThreadedRecipientStore
    from smtpgw.services import OrderedMultiService
    from smtpgw.session import GatewaySMTPFactory
    from smtpgw.stats import CountingOutbound, CountingQueue, DailyStats
    from smtpgw.tls import TLSConfigError, install_sighup_reload, reloadable_tls
    from smtpgw.userstore import ThreadedUserStore

    if reactor is None:
        reactor = _reactor()
    data_dir = FilePath(os.path.abspath(options["data-dir"]))
    try:
        data_dir.makedirs(ignoreExistingDirectory=True)
    except OSError as e:
        raise usage.UsageError(f"--data-dir {data_dir.path}: {e.strerror}") from None
    limits: Limits = options["limits"]
    owner = _run_as(options)
    key_reader = None
    if owner is not None and options["tls-cert"] and options["tls-key"]:
        # After the drop, the gateway's user may not read the files: a
        # helper started as root (in privilegedStartService, after twistd
        # daemonized) reads them for each reload.
        from smtpgw.keyreader import PrivilegedReader

        key_reader = PrivilegedReader(
            [FilePath(options[name]) for name in ("tls-cert", "tls-key")]
        )
    try:
        tls = reloadable_tls(
            data_dir.path,
            options["hostname"],
            options["tls-cert"],
            options["tls-key"],
            owner=owner,
            reader=None if key_reader is None else key_reader.read,
        )
    except TLSConfigError as e:
        raise usage.UsageError(str(e)) from None

    top = OrderedMultiService()
    if key_reader is not None:
        _KeyReaderService(key_reader).setServiceParent(top)
    db = database_path(data_dir.path)
    users = ThreadedUserStore(db, reactor=reactor, clock=reactor)
    users.setServiceParent(top)
    bcrypt = BcryptPool(reactor)
    bcrypt.setServiceParent(top)
    alerts = SQLiteAlertStore(db, reactor=reactor)
    alerts.setServiceParent(top)
    # Before the outbound and the queue, so it stops after them and writes
    # the counts of the last deliveries.
    stats = DailyStats(db, reactor=reactor, clock=reactor)
    stats.setServiceParent(top)
    metrics = GatewayMetrics()
    # The queue replays, starts and (after draining) stops the journal.
    journal = FileJournal(
        data_dir.child("journal").path, reactor, fsync_observer=metrics.observe_fsync
    )
    outbound = _outbound(options, data_dir, reactor)
    outbound.setServiceParent(top)
    # Before the queue, so the campaign runner (after the queue) finds them
    # running and they stop after it.
    campaigns = ThreadedCampaignStore(db, reactor=reactor, clock=reactor)
    campaigns.setServiceParent(top)
    recipients = ThreadedRecipientStore(db, reactor=reactor, clock=reactor)
    recipients.setServiceParent(top)
    queue_ids = QueueIdGenerator()
    queue = MessageQueue(
        journal,
        CountingOutbound(outbound, stats, metrics),  # type: ignore[arg-type]
        reactor,
        rate=options["rate"],
        concurrency=options["concurrency"],
        freeze_after_replay=True,
        rng=random.random,
        max_queue_age=options["max-queue-age"],
        alerts=alerts,
        hostname=options["hostname"],
        queue_ids=queue_ids,
        gate_of=campaign_gate,
        preemption_grace=options["preemption-grace"],
        mark_sending=options["relay"] != "discard",
    )
    queue.setServiceParent(top)
    metrics.track_queue(queue)
    try:
        runner = CampaignRunner(
            campaigns,
            queue,
            reactor,
            hostname=options["hostname"],
            base_url=options["public-url"],
        )
    except ValueError as e:
        raise usage.UsageError(f"--public-url: {e}") from None
    runner.setServiceParent(top)
    # After the queue, so it stops first; it listens only after twistd has
    # dropped privileges, so the socket belongs to the gateway's user.
    ControlService(QueueControl(queue, journal, reactor), data_dir.path, reactor).setServiceParent(
        top
    )
    reloadable = _Reload(tls, None, reactor)
    # Whether anything answers SMTP (for /healthz): acceptors when there
    # are, else the listener this process bound, which serves while it runs.
    smtp_up: Any = lambda: True  # noqa: E731

    # This process's session factories (the acceptors' sessions are counted
    # by the pool), for the journal's writer: messages about to come.
    factories: list[GatewaySMTPFactory] = []
    elsewhere: list[Callable[[], int]] = []

    def in_data() -> int:
        # On the journal's writer thread: copies, and reads only.
        coming = sum(f.in_data for f in tuple(factories))
        return coming + sum(count() for count in tuple(elsewhere))

    journal.expected_soon = in_data

    def smtp_factory(**shared: Any) -> GatewaySMTPFactory:
        # The sessions of this process (all of them without acceptors);
        # beside acceptors, with their limiters and alert filter.
        portal = Portal(
            GatewayRealm(),
            [SmtpUserChecker(users, reactor, bcrypt=bcrypt, changes=users.change_token)],
        )
        arguments: dict[str, Any] = {
            "portal": portal,
            "queue": CountingQueue(queue, stats),
            "alerts": alerts,
            "users": users,
            "hostname": options["hostname"],
            "limits": limits,
            "tls": tls.options,
            "require_tls": bool(options["require-tls"]),
            "clock": reactor,
            "queue_ids": queue_ids,
            "metrics": metrics,
        }
        arguments.update(shared)
        made = GatewaySMTPFactory(**arguments)
        factories.append(made)
        return made

    if options["acceptors"]:
        pool, here = _acceptor_pool(
            options, data_dir, reactor, queue, stats, alerts, metrics, tls, smtp_factory
        )
        elsewhere.append(pool.in_data)
        reloadable = _Reload(tls, pool, reactor)
        smtp_up = lambda: pool.ready > 0 or here.serving  # noqa: E731
    else:
        factory = smtp_factory()
        listener = MultiPortListener(
            reactor=reactor,
            ports=options["ports"],
            interface=options["interface"],
            factory=factory,
        )
        listener.setServiceParent(top)
    if options["admin"] is not None:
        _admin_service(
            options,
            db,
            reactor,
            users,
            alerts,
            queue,
            journal,
            stats,
            metrics,
            recipients,
            campaigns,
            runner,
            smtp_up,
        ).setServiceParent(top)
    _SighupService(reactor, reloadable, install_sighup_reload).setServiceParent(top)
    if owner is not None:
        _hand_over(data_dir, owner)
    return top


def _acceptor_pool(
    options: Options,
    data_dir: FilePath[str],
    reactor: Any,
    queue: Any,
    stats: Any,
    alerts: Any,
    metrics: Any,
    tls: Any,
    smtp_factory: Callable[..., Any],
) -> tuple[Any, Any]:
    """
    The listener that binds the ports without accepting, the acceptor
    processes that accept on them, and this process's own accepting should
    no acceptor start (added to the service tree in that order by the
    caller's parent: here, to the queue's parent).

    @param smtp_factory: builds this process's SMTP factory, given what it
        shares with the acceptors (connection and auth limiters, the filter
        of repeated sender alerts) and its limits.
    @return: the pool and the fallback (L{MainProcessAcceptor}).
    """
    from twisted.internet.protocol import ServerFactory

    from smtpgw.abuse import AuthFailureTracker, ConnectionCounter, RepeatedAlertFilter
    from smtpgw.acceptors import AcceptorConfig, AcceptorPool, MainProcessAcceptor
    from smtpgw.listening import MultiPortListener, bind_only
    from smtpgw.stats import CountingQueue

    limits: Limits = options["limits"]
    top = queue.parent
    listener = MultiPortListener(
        reactor=reactor,
        ports=options["ports"],
        interface=options["interface"],
        factory=ServerFactory(),
        listen=bind_only,
    )
    listener.setServiceParent(top)
    connections = ConnectionCounter(
        limits.max_connections_per_ip, total_limit=limits.max_connections
    )
    auth = AuthFailureTracker(
        limit=limits.auth_failure_limit, window=limits.auth_failure_window, clock=reactor
    )
    sender_alerts = RepeatedAlertFilter(alerts, reactor, window=limits.sender_alert_window)
    here = MainProcessAcceptor(
        reactor,
        listener.file_descriptors,
        lambda: smtp_factory(
            connection_limiter=connections,
            auth_limiter=auth,
            # Repeated sender alerts are held back once, for all.
            alerts=sender_alerts,
            limits=attrs.evolve(limits, sender_alert_window=0.0),
        ),
    )
    pool = AcceptorPool(
        reactor=reactor,
        count=options["acceptors"],
        config=AcceptorConfig(
            data_dir=data_dir.path,
            hostname=options["hostname"],
            limits=limits,
            require_tls=bool(options["require-tls"]),
            acceptors=options["acceptors"],
        ),
        sockets=listener.file_descriptors,
        queue=CountingQueue(queue, stats),
        connections=connections,
        auth=auth,
        alerts=sender_alerts,
        metrics=metrics,
        tls=tls,
        fallback=here.start,
    )
    pool.setServiceParent(top)
    # Stops first: its sessions hand messages to the queue.
    here.setServiceParent(top)
    return pool, here


class _Reload:
    """
    Reloads the certificate, its files read in a thread (the privileged
    key reader may wait on its helper), then sends it to every acceptor
    process, if there are.
    """

    def __init__(self, tls: Any, pool: Any, reactor: Any) -> None:
        self._tls = tls
        self._pool = pool
        self._reactor = reactor

    def reload(self) -> Deferred[bool]:
        reloading: Deferred[bool] = self._tls.reload_in_thread(self._reactor)
        reloading.addCallback(self._reloaded)
        # Nobody waits on a SIGHUP's reload: what fails is logged here.
        return reloading.addErrback(self._failed)

    def _failed(self, failure: Failure) -> bool:
        log.failure("sending the reloaded certificate to the acceptors failed", failure)
        return False

    def _reloaded(self, reloaded: bool) -> bool:
        if reloaded and self._pool is not None:
            # The acceptors get what the main process read: they may not be
            # allowed to read the files themselves.
            self._pool.send_tls()
        return reloaded


def _admin_service(
    options: Options,
    db: Any,
    reactor: Any,
    users: Any,
    alerts: Any,
    queue: Any,
    journal: Any,
    stats: Any,
    metrics: Any,
    recipients: Any,
    campaigns: Any,
    runner: Any,
    smtp_up: Any,
) -> IService:
    """
    The admin accounts, the first admin, and the admin app listening on
    C{--admin}.
    """
    from twisted.application.internet import StreamServerEndpointService, TimerService
    from twisted.internet.endpoints import serverFromString

    from smtpgw.admins import ThreadedAdminStore
    from smtpgw.control import QueueControl
    from smtpgw.services import OrderedMultiService
    from web.app import admin_site
    from web.context import GatewaySettings, WebContext

    try:
        endpoint = serverFromString(reactor, options["admin"])
    except (ValueError, TypeError, KeyError) as e:
        raise usage.UsageError(f"--admin {options['admin']!r}: {e}") from None
    admin = OrderedMultiService()
    admins = ThreadedAdminStore(db, reactor=reactor, clock=reactor)
    admins.setServiceParent(admin)
    _FirstAdmin(admins).setServiceParent(admin)
    purge = TimerService(SESSION_PURGE_INTERVAL, _purge_sessions, admins)
    purge.clock = reactor
    purge.setServiceParent(admin)
    ctx = WebContext(
        users=users,
        admins=admins,
        alerts=alerts,
        clock=reactor,
        settings=GatewaySettings(
            hostname=options["hostname"],
            ports=options["ports-text"],
            require_tls=bool(options["require-tls"]),
            base_url=options["public-url"],
        ),
        control=QueueControl(queue, journal, reactor),
        stats=stats,
        metrics=metrics,
        recipients=recipients,
        campaigns=campaigns,
        runner=runner,
        health=lambda: {
            "journal": bool(journal.accepting),
            "queue": bool(queue.running),
            "smtp": bool(smtp_up()),
        },
    )
    web = StreamServerEndpointService(endpoint, admin_site(ctx))
    web._raiseSynchronously = True
    web.setServiceParent(admin)
    return admin


SESSION_PURGE_INTERVAL = 3600.0
"""Seconds between sweeps of ended admin sessions out of the database."""


def _purge_sessions(admins: Any) -> Any:
    return admins.purge_sessions().addErrback(
        lambda f: log.warn("Could not purge ended admin sessions: {e}", e=f.getErrorMessage())
    )


class _FirstAdmin(Service):
    """
    On the first start, makes the admin account and logs its password,
    the only time it is shown.
    """

    def __init__(self, admins: Any) -> None:
        self._admins = admins

    def startService(self) -> None:
        super().startService()

        def made(password: str | None) -> None:
            if password is not None:
                log.warn(
                    "First start: made the admin account 'admin' with the password "
                    "{password} (shown only this once; change it with "
                    "'smtpgw-admin admin password admin')",
                    password=password,
                )

        self._admins.ensure_first_admin().addCallbacks(
            made, lambda f: log.failure("Could not make the first admin account", f)
        )


class _KeyReaderService(Service):
    """
    Starts the privileged reader of the TLS files while the gateway is
    still root, and ends it when the gateway stops.
    """

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.reader.start()

    def stopService(self) -> None:
        super().stopService()
        self.reader.stop()


class _SighupService(Service):
    """
    Reloads the TLS certificate on C{SIGHUP} while the gateway runs.
    """

    def __init__(self, reactor: Any, tls: Any, install: Any) -> None:
        self._reactor = reactor
        self._tls = tls
        self._install = install
        self._uninstall: Any = None

    def startService(self) -> None:
        super().startService()
        self._uninstall = self._install(self._reactor, self._tls)

    def stopService(self) -> None:
        super().stopService()
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None


__all__ = ["Options", "makeService"]
