"""
The servers the benchmark measures, each started on 127.0.0.1 in a work
directory of its own and stopped afterwards:

  - L{SmtpSink}: Postfix's C{smtp-sink}, which throws mail away: the
    machine's limit (no durability);
  - L{TwistedBare}: L{bench.twisted_server}, Twisted's own ESMTP with AUTH
    and no durability;
  - L{Postfix}: a throwaway Postfix instance with its own configuration and
    durable queue, delivering to its C{discard} transport (or, with C{hold},
    keeping every message in its hold queue);
  - L{Gateway}: smtpgw under C{twistd}, driven as an operator would (with
    C{hold}, its send queue stopped so that every message is kept).

Each only ever listens on loopback, and each is stopped by the process id it
started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from attrs import define, field, frozen

from bench.tls import CertFiles, describe_key, make_self_signed

LOOPBACK = "127.0.0.1"


class ServerError(Exception):
    """
    A server could not be started or configured.
    """


@frozen
class Started:
    """
    A server that is up.

    @ivar port: where it listens on 127.0.0.1.
    @ivar root_pid: the process whose tree is the server (for CPU time).
    @ivar username: the AUTH user to send with, or L{None} for no AUTH.
    @ivar password: its password.
    @ivar notes: facts that qualify the figures (e.g. "no AUTH").
    @ivar log: the server's log file, searched for problems after the row.
    """

    port: int
    root_pid: int
    username: str | None
    password: str | None = field(repr=False)
    notes: tuple[str, ...] = ()
    log: Path | None = None


class Server(Protocol):
    """
    A server the benchmark can start, measure and stop.
    """

    name: str

    def unavailable(self) -> str | None:
        """
        @return: why it cannot run on this machine, or L{None}.
        """

    def start(self, workdir: Path) -> Started:
        """
        Start it on 127.0.0.1, keeping its files under C{workdir}.
        """

    def stop(self) -> None:
        """
        Stop what C{start} started.
        """


def free_port() -> int:
    """
    @return: a TCP port that was free on 127.0.0.1 a moment ago.
    """
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def can_connect(port: int, timeout: float = 0.2) -> bool:
    """
    @return: whether a TCP connection to 127.0.0.1:C{port} succeeds now.
    """
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 15) -> str:
    """
    @return: the last lines of a log file, for an error message.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: Path, limit: float, poll: float = 0.02
) -> None:
    """
    Wait until C{port} on 127.0.0.1 takes connections.

    @param log: the process's log, whose tail the error shows.
    @param poll: seconds between tries.
    @raise ServerError: when the process exits first, or C{limit} seconds
        pass.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"exited with status {process.returncode}:\n{tail(log)}")
        if can_connect(port):
            return
        time.sleep(poll)
    raise ServerError(f"port {port} not open after {limit:.0f}s:\n{tail(log)}")


def _terminate(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@define
class SmtpSink:
    """
    Postfix's C{smtp-sink}: answers every command, keeps nothing.
    """

    name: str = "smtp-sink"
    process: subprocess.Popen[bytes] | None = None

    def unavailable(self) -> str | None:
        """
        @return: why this server cannot run here, or L{None}.
        """
        if shutil.which("smtp-sink") is None:
            return "smtp-sink not installed (Debian package postfix)"
        return None

    def start(self, workdir: Path) -> Started:
        """
        Start it on a free loopback port.
        """
        port = free_port()
        log = workdir / "smtp-sink.log"
        with log.open("ab") as output:
            # As root it must be told whom to run as.
            self.process = subprocess.Popen(
                ["smtp-sink", "-u", "nobody", "-4", f"{LOOPBACK}:{port}", "1024"],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(port, self.process, log, 10)
        return Started(
            port=port,
            root_pid=self.process.pid,
            username="bench",
            password="bench",
            notes=("discards everything; accepts any AUTH",),
            log=log,
        )

    def stop(self) -> None:
        """
        Stop it.
        """
        if self.process is not None:
            _terminate(self.process, 5)


@define
class TwistedBare:
    """
    L{bench.twisted_server} in a process of its own.

    @ivar pipelining: advertise PIPELINING (stock Twisted does not).
    """

    pipelining: bool = False
    name: str = "twisted"
    process: subprocess.Popen[bytes] | None = None

    def unavailable(self) -> str | None:
        """
        @return: L{None}: it needs only this virtualenv.
        """
        return None

    def start(self, workdir: Path) -> Started:
        """
        Start it on a free loopback port, with STARTTLS.
        """
        files = make_self_signed(workdir / "twisted-tls")
        port = free_port()
        log = workdir / "twisted.log"
        argv = [sys.executable, "-m", "bench.twisted_server", "--port", str(port)]
        argv += ["--cert", str(files.cert), "--key", str(files.key)]
        argv += ["--user", "bench", "--password", "bench"]
        if self.pipelining:
            argv.append("--pipelining")
        with log.open("ab") as output:
            self.process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        wait_for_port(port, self.process, log, 30)
        notes = [
            "AUTH against an in-memory table, messages discarded, no durability",
            f"TLS key {describe_key(files.cert.read_bytes())}",
        ]
        if not self.pipelining:
            notes.append("no PIPELINING (stock Twisted)")
        return Started(
            port=port,
            root_pid=self.process.pid,
            username="bench",
            password="bench",
            notes=tuple(notes),
            log=log,
        )

    def stop(self) -> None:
        """
        Stop it.
        """
        if self.process is not None:
            _terminate(self.process, 10)


#: The services a Postfix instance needs, as in Debian's master.cf but with
#: nothing chrooted (the queue lives in a temporary directory) and SMTP only
#: on the loopback port the benchmark picked.
_MASTER_SERVICES = """\
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
proxywrite unix - - n -     1 proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
local     unix  - n n -     - local
virtual   unix  - n n -     - virtual
lmtp      unix  - - n -     - lmtp
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_version() -> str | None:
    """
    @return: the installed Postfix's version, or L{None}.
    """
    if shutil.which("postconf") is None:
        return None
    done = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None


#: The C{header_checks} table that puts every message on hold: C{cleanup}
#: writes it durably to the hold queue (the same fsync before the C{250})
#: and C{qmgr} never sees it. Every message the load generator builds has a
#: C{Subject:} header (L{bench.loadgen.build_message}).
HOLD_HEADER_CHECKS = "/^Subject:/ HOLD\n"

#: Where L{Postfix.write_config} puts that table, under the instance's base.
HOLD_CHECKS_FILE = "hold.regexp"


def hold_settings(checks: Path) -> tuple[str, ...]:
    """
    @param checks: the file holding L{HOLD_HEADER_CHECKS}.
    @return: the C{main.cf} lines that hold every message on arrival.
    """
    return (f"header_checks = regexp:{checks}",)


@define
class Postfix:
    """
    A throwaway Postfix instance: configuration, queue and data directories
    under the work directory, SMTP on one loopback port, every message
    delivered to the C{discard} transport so nothing leaves the machine.

    It relays for 127.0.0.0/8 without AUTH (Postfix's SASL needs a Cyrus or
    Dovecot back end that is not installed), so its rows do one round trip
    less per connection than the gateway's: the comparison favours Postfix.

    @ivar settings: more C{main.cf} lines (C{name = value}), appended last.
    @ivar hold: put every message on hold on arrival (L{HOLD_HEADER_CHECKS}):
        durable in the hold queue, never delivered.
    """

    settings: Sequence[str] = ()
    hold: bool = False
    name: str = "postfix"
    config: Path | None = None
    master_pid: int | None = None
    queue: Path | None = None

    def unavailable(self) -> str | None:
        """
        @return: why Postfix cannot run here, or L{None}.
        """
        if shutil.which("postfix") is None or shutil.which("postconf") is None:
            return "postfix not installed (Debian package postfix)"
        if os.geteuid() != 0:
            return "a throwaway Postfix instance needs root"
        return None

    def start(self, workdir: Path) -> Started:
        """
        Configure and start the instance on a free loopback port.
        """
        base = workdir / "postfix"
        queue, data, maillog = base / "queue", base / "data", base / "maillog"
        for directory in (queue, data):
            directory.mkdir(parents=True)
        shutil.chown(data, user="postfix")
        files = make_self_signed(base / "tls")
        port = free_port()
        config = self.write_config(base, port, files)
        self.config = config
        self.queue = queue
        done = subprocess.run(
            ["postfix", "-c", str(config), "start"], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise ServerError(f"postfix start failed: {done.stderr.strip()}\n{tail(maillog)}")
        pid_file = queue / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.master_pid = int(pid_file.read_text().split()[0])
            if self.master_pid is not None and can_connect(port):
                break
            time.sleep(0.05)
        else:
            raise ServerError(f"postfix did not open port {port}:\n{tail(maillog)}")
        return Started(
            port=port,
            root_pid=self.master_pid,
            username=None,
            password=None,
            notes=(
                f"Postfix {postfix_version()}",
                "no AUTH: relays for 127.0.0.0/8 (the gateway pays for AUTH)",
                "held on arrival (header_checks /^Subject:/ HOLD): durable in the hold "
                "queue, not delivered"
                if self.hold
                else "durable queue, delivered to the discard transport",
                *(f"main.cf: {setting}" for setting in self.settings),
                f"TLS key {describe_key(files.cert.read_bytes())}",
            ),
            log=maillog,
        )

    def write_config(self, base: Path, port: int, tls: CertFiles) -> Path:
        """
        Write the instance's C{main.cf} and C{master.cf} (and, with C{hold},
        its header checks) under C{base}.

        @param base: the instance's directory; its queue is C{base/queue}.
        @param port: the loopback port its C{smtpd} listens on.
        @param tls: its certificate and key.
        @return: the configuration directory, for C{postfix -c}.
        """
        config = base / "conf"
        config.mkdir(parents=True, exist_ok=True)
        main_cf = self._main_cf(base, base / "queue", base / "data", base / "maillog", tls)
        settings = list(self.settings)
        if self.hold:
            checks = base / HOLD_CHECKS_FILE
            checks.write_text(HOLD_HEADER_CHECKS)
            settings[:0] = hold_settings(checks)
        main_cf += "".join(f"{setting}\n" for setting in settings)
        (config / "main.cf").write_text(main_cf)
        (config / "master.cf").write_text(
            f"{LOOPBACK}:{port} inet n - n - - smtpd\n" + _MASTER_SERVICES
        )
        return config

    def held_count(self) -> int | None:
        """
        @return: how many messages are in the instance's hold queue now, or
            L{None} when it has not been started.
        """
        if self.queue is None:
            return None
        hold = self.queue / "hold"
        return sum(1 for path in hold.rglob("*") if path.is_file()) if hold.is_dir() else 0

    @staticmethod
    def _main_cf(base: Path, queue: Path, data: Path, maillog: Path, tls: CertFiles) -> str:
        return f"""\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.invalid
mydomain = invalid
myorigin = $myhostname
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = discard:benchmark
relay_transport = discard:benchmark
local_transport = discard:benchmark
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = {maillog}
maillog_file_prefixes = {base}
smtpd_tls_cert_file = {tls.cert}
smtpd_tls_key_file = {tls.key}
smtpd_tls_security_level = may
biff = no
"""

    def stop(self) -> None:
        """
        Stop the instance and wait for its master to exit.
        """
        if self.config is None:
            return
        subprocess.run(
            ["postfix", "-c", str(self.config), "stop"], capture_output=True, check=False
        )
        deadline = time.monotonic() + 20
        while self.master_pid is not None and time.monotonic() < deadline:
            try:
                os.kill(self.master_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            if self.master_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.master_pid, signal.SIGKILL)
        self.config = None


def system_postfix_running() -> bool:
    """
    @return: whether the machine's own Postfix (default configuration) runs;
        the benchmark leaves it alone.
    """
    if shutil.which("postfix") is None:
        return False
    done = subprocess.run(["postfix", "status"], capture_output=True, check=False)
    return done.returncode == 0


def _venv_tool(name: str) -> Path:
    return Path(sys.executable).with_name(name)


def gateway_unavailable() -> str | None:
    """
    @return: why the gateway cannot be run from this virtualenv, or L{None}.
    """
    twistd = _venv_tool("twistd")
    if not twistd.exists():
        return f"{twistd} not found"
    try:
        done = subprocess.run(
            [str(twistd), "smtpgw", "--help"], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "`twistd smtpgw --help` did not finish in 120s"
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        return f"`twistd smtpgw --help` failed: {lines[-1] if lines else done.returncode}"
    if not _venv_tool("smtpgw-admin").exists():
        return "smtpgw-admin not installed in the virtualenv"
    return None


def _admin(data_dir: Path, *args: str) -> dict[str, Any]:
    argv = [str(_venv_tool("smtpgw-admin")), "--data-dir", str(data_dir), "--json", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ServerError(f"smtpgw-admin {' '.join(args)}: {done.stderr.strip()}")
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError as error:
        raise ServerError(f"smtpgw-admin {' '.join(args)}: not JSON: {done.stdout!r}") from error
    return result


#: How long the gateway's control socket may take to answer after its SMTP
#: port opened.
CONTROL_WAIT = 30.0


def option_value(argv: Sequence[str], name: str) -> str | None:
    """
    @param argv: command-line options, e.g. C{["--acceptors", "0"]}.
    @param name: an option that takes a value, e.g. C{"--acceptors"}.
    @return: its last value (C{--name V} or C{--name=V}), or L{None}.
    """
    value = None
    for index, word in enumerate(argv):
        if word == name and index + 1 < len(argv):
            value = argv[index + 1]
        elif word.startswith(name + "="):
            value = word[len(name) + 1 :]
    return value


@define
class Gateway:
    """
    smtpgw under C{twistd -n}, with a fresh data directory, one list and one
    SMTP+ user allowed to send from example.com, C{--relay discard} (as the
    Postfix rows deliver to its C{discard} agent) and twistd's log written
    by L{smtpgw.logs.observer} (one write per reactor turn).

    @ivar ports: the C{--ports} value, or L{None} for one free port.
    @ivar extra: more command-line options (e.g. C{--rate 1000}).
    @ivar twistd: more C{twistd} options, before C{smtpgw} (e.g.
        C{--profile=FILE --profiler=cprofile} to profile it under load).
    @ivar relay: the C{--relay} value.
    @ivar logger: the C{twistd --logger} value (L{None}: twistd's own).
    @ivar hold: stop its send queue (C{smtpgw-admin queue stop}) as soon as
        it is up, so that every message is journaled and kept, none
        delivered.
    """

    ports: str | None = None
    extra: Sequence[str] = ()
    twistd: Sequence[str] = ()
    hold: bool = False
    relay: str = "discard"
    logger: str | None = "smtpgw.logs.observer"
    name: str = "gateway"
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    data_dir: Path | None = None

    def unavailable(self) -> str | None:
        """
        @return: why the gateway cannot run, or L{None}.
        """
        return gateway_unavailable()

    def argv(self, data_dir: Path, ports: str | None) -> list[str]:
        """
        @return: the gateway's command line.
        """
        argv = [str(_venv_tool("twistd")), "-n", "--pidfile="]
        if self.logger is not None:
            argv.append(f"--logger={self.logger}")
        argv += [*self.twistd, "smtpgw", "--data-dir", str(data_dir)]
        if ports is not None:
            argv += ["--ports", ports]
        argv += ["--interface", LOOPBACK, "--relay", self.relay]
        # No admin app: the acceptance rows measure SMTP only.
        argv += ["--admin", "none", "--public-url", "http://bench.test", *self.extra]
        return argv

    def create_user(self, data_dir: Path) -> tuple[str, str]:
        """
        Create the C{bench} list and a user of it.

        @return: the username and password.
        """
        _admin(data_dir, "list", "add", "bench")
        user = _admin(data_dir, "user", "add", "--list", "bench", "--domains", "example.com")
        return str(user["username"]), str(user["password"])

    def spawn(self, workdir: Path, ports: str | None) -> subprocess.Popen[bytes]:
        """
        Start the process without waiting for it.
        """
        self.data_dir = workdir / "gateway-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "gateway.log"
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                self.argv(self.data_dir, ports),
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        return self.process

    def start(self, workdir: Path) -> Started:
        """
        Create the user, start the gateway, wait for its port.
        """
        data_dir = workdir / "gateway-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        username, password = self.create_user(data_dir)
        port = free_port()
        process = self.spawn(workdir, str(port))
        assert self.log is not None
        wait_for_port(port, process, self.log, 60)
        acceptors = option_value(self.extra, "--acceptors")
        notes = [
            "AUTH PLAIN (bcrypt, as configured)",
            f"--relay {self.relay}",
            "twistd's own log" if self.logger is None else f"twistd --logger={self.logger}",
            "--acceptors auto (the default)" if acceptors is None else f"--acceptors {acceptors}",
        ]
        if self.hold:
            try:
                self.stop_queue(data_dir, process)
            except ServerError:
                # The caller only stops what started.
                self.stop()
                raise
            notes.append(
                "queue stopped (smtpgw-admin queue stop): journaled and kept, not delivered"
            )
        tls_dir = data_dir / "tls"
        for path in sorted(tls_dir.iterdir()) if tls_dir.is_dir() else []:
            with contextlib.suppress(ValueError, OSError):
                notes.append(f"TLS key {describe_key(path.read_bytes())}")
                break
        return Started(
            port=port,
            root_pid=process.pid,
            username=username,
            password=password,
            notes=tuple(notes),
            log=self.log,
        )

    def stop_queue(self, data_dir: Path, process: subprocess.Popen[bytes]) -> None:
        """
        Stop the send queue through the control socket, which may answer a
        little after the SMTP port opened.

        @raise ServerError: when the gateway exits or its control socket
            does not answer within L{CONTROL_WAIT} seconds.
        """
        deadline = time.monotonic() + CONTROL_WAIT
        while True:
            try:
                status = _admin(data_dir, "queue", "stop")
            except (ServerError, subprocess.TimeoutExpired) as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise ServerError(f"could not stop the queue: {error}") from error
                time.sleep(0.2)
                continue
            if not status.get("paused"):
                raise ServerError(f"queue stop: the queue is not stopped: {status}")
            return

    def held_count(self) -> int | None:
        """
        @return: how many messages the running gateway's queue holds
            (queued, sending, deferred or held), or L{None} when it is not
            running.
        """
        if self.data_dir is None or self.process is None or self.process.poll() is not None:
            return None
        status = _admin(self.data_dir, "queue", "list", "--limit", "1")
        counts = status.get("counts") or {}
        return sum(int(count) for count in counts.values())

    def stop(self) -> None:
        """
        Stop the gateway (SIGTERM, then SIGKILL after 30 s).
        """
        if self.process is not None:
            _terminate(self.process, 30)


#: Log lines that say something went wrong: Twisted's error and critical
#: levels and tracebacks, Postfix's warnings, errors, fatals and panics.
PROBLEM = re.compile(
    r"#(error|critical)\]|Traceback|Unhandled|postfix/\S+\[\d+\]: (warning|error|fatal|panic):"
)


#: Problems of the machine rather than of the server: a virtual machine's
#: clock and its disk's timestamps may disagree by a second.
_HARMLESS = re.compile(r"warning: file system clock is \d+ seconds? ahead of local clock")


def log_problems(path: Path | None) -> dict[str, Any]:
    """
    @param path: a server's log file.
    @return: how many lines in it report a problem, and the first of them.
    """
    count = 0
    first = None
    if path is not None and path.exists():
        with path.open(errors="replace") as lines:
            for line in lines:
                if PROBLEM.search(line) and not _HARMLESS.search(line):
                    count += 1
                    first = first or line.strip()[:300]
    return {"count": count, "first": first}


#: The gateway's own summary of binding, e.g. "listening on 3980 of 3980
#: ports of 127.0.0.1 in 0.105s".
BIND_SUMMARY = re.compile(
    r"listening on (?P<bound>\d+) of (?P<total>\d+) ports\b.*?\bin (?P<seconds>[0-9.]+)s"
)
