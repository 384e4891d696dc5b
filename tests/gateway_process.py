"""
Run the real gateway (C{twistd -n smtpgw}) as a child process for
end-to-end tests, and drive C{smtpgw-admin} against its data directory.

Waiting here is on real processes and sockets, so it polls with a deadline;
protocol logic is tested elsewhere with a Clock.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from attrs import define, field

#: Gateways started and not yet stopped: killed when the test run ends,
#: whatever failed on the way, so no test leaves a process behind.
_RUNNING: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_RUNNING):
        if process.poll() is None:
            process.kill()
            process.wait()


BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
ADMIN = str(BIN / "smtpgw-admin")
#: bcrypt rounds for users made by the tests: the gateway checks any rounds.
TEST_ROUNDS = "4"


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
) -> None:
    """
    Poll C{predicate} until it is true, failing after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.02)


def admin(data_dir: Path, *args: str, check: bool = True) -> Any:
    """
    Run C{smtpgw-admin --data-dir DIR --json ARGS} and return its JSON output.
    """
    env = dict(os.environ, SMTPGW_BCRYPT_ROUNDS=TEST_ROUNDS)
    result = subprocess.run(
        [ADMIN, "--data-dir", str(data_dir), "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"smtpgw-admin {' '.join(args)} failed: {result.stderr}")
    return json.loads(result.stdout) if result.stdout.strip() else None


@define
class Credentials:
    username: str
    password: str = field(repr=False)


def add_user(data_dir: Path, mail_list: str, *options: str) -> Credentials:
    """
    Create an SMTP+ user (and its list when missing); return its credentials.
    """
    lists = admin(data_dir, "list", "show")
    names = {entry["name"] for entry in lists["lists"]}
    if mail_list not in names:
        admin(data_dir, "list", "add", mail_list)
    document = admin(data_dir, "user", "add", "--list", mail_list, *options)
    return Credentials(document["username"], document["password"])


def _acceptors_from_environment() -> list[str]:
    """
    C{--acceptors N} when C{SMTPGW_TEST_ACCEPTORS} is set: the whole
    end-to-end suite can run against either process model (a test's own
    C{extra_args} still win).
    """
    count = os.environ.get("SMTPGW_TEST_ACCEPTORS", "").strip()
    return ["--acceptors", count] if count else []


@define
class Gateway:
    """
    One C{twistd -n smtpgw} child process on 127.0.0.1.
    """

    data_dir: Path
    port: int
    extra_args: Sequence[str] = ()
    relay: str = "capture"
    admin_port: int | None = None
    #: Where SMTP listens (and the tests connect): 127.0.0.1, or ::1.
    interface: str = "127.0.0.1"
    #: twistd's own options (before C{smtpgw}), such as C{--uid}.
    twistd_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    starts: int = 0

    def __attrs_post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-gateway.log"

    def argv(self) -> list[str]:
        return [
            TWISTD,
            "-n",
            "--pidfile=",
            *self.twistd_args,
            "smtpgw",
            "--data-dir",
            str(self.data_dir),
            "--ports",
            str(self.port),
            "--interface",
            self.interface,
            "--hostname",
            "gateway.test",
            "--relay",
            self.relay,
            "--admin",
            "none" if self.admin_port is None else f"tcp:{self.admin_port}:interface=127.0.0.1",
            "--public-url",
            "http://gateway.test"
            if self.admin_port is None
            else f"http://127.0.0.1:{self.admin_port}",
            *_acceptors_from_environment(),
            *self.extra_args,
        ]

    @property
    def admin_url(self) -> str:
        """
        The admin app's base URL (with C{admin_port} set).
        """
        assert self.admin_port is not None, "started without an admin port"
        return f"http://127.0.0.1:{self.admin_port}"

    def first_admin_password(self, timeout: float = 30.0) -> str:
        """
        The password the first start logged for the admin account.
        """
        found: list[str] = []

        def logged() -> bool:
            match = re.search(r"'admin' with the password (\S+) ", self.log_text())
            if match:
                found.append(match.group(1))
            return bool(found)

        wait_until(logged, timeout, "the first admin's password in the log")
        return found[0]

    def wait_admin(self, timeout: float = 30.0) -> None:
        """
        Wait until the admin app answers.
        """

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.admin_port or 0), timeout=5):
                    return True
            except OSError:
                return False

        wait_until(answers, timeout, f"admin app on port {self.admin_port}")

    def start(self, timeout: float = 30.0) -> None:
        assert self.process is None, "already running"
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        _RUNNING.add(self.process)
        wait_until(self._greets, timeout, f"gateway to greet on port {self.port}")

    def _greets(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"gateway exited with {self.process.returncode}:\n{self.log_tail()}"
            )
        try:
            with socket.create_connection((self.interface, self.port), timeout=5) as s:
                return s.recv(512).startswith(b"220 ")
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> bool:
        """
        SIGTERM, wait for the process to end; return whether it shut down
        cleanly (twistd re-raises SIGTERM after its clean shutdown, so the
        exit status is -15; the log tells a clean shutdown apart).
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            _RUNNING.discard(self.process)
            self.process = None
        clean_end = self.log_text().rstrip().endswith("Server Shut Down.")
        return code in (0, -signal.SIGTERM) and clean_end

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        _RUNNING.discard(self.process)
        self.process = None

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # The capture relay's outputs.

    @property
    def captured(self) -> Path:
        return self.data_dir / "captured"

    def index(self) -> list[dict[str, Any]]:
        path = self.captured / "index.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_delivered(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.index()) >= count, timeout, f"{count} deliveries")
        return self.index()

    def tls_context(self) -> ssl.SSLContext:
        """
        A client context that trusts the gateway's self-signed certificate.
        """
        context = ssl.create_default_context(cafile=str(self.data_dir / "tls" / "selfsigned.crt"))
        context.check_hostname = False
        return context


@define
class RelayTargetProcess:
    """
    The test relay target (a real Twisted ESMTP server) as a child process on
    127.0.0.1; what it takes is read back from its JSON lines.
    """

    directory: Path
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def output(self) -> Path:
        return self.directory / "relayed.jsonl"

    def start(self, timeout: float = 30.0) -> None:
        assert self.process is None
        with (self.directory / "relay-target.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.relay_target_main",
                    str(self.output),
                    *self.extra_args,
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        _RUNNING.add(self.process)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        assert line.startswith("PORT "), line
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()
            _RUNNING.discard(self.process)
            self.process = None

    def received(self) -> list[dict[str, Any]]:
        if not self.output.exists():
            return []
        taken: list[dict[str, Any]] = []
        text = self.output.read_text()
        # The target may be writing a line right now: only whole lines,
        # each ended by its newline, are read.
        for line in text[: text.rfind("\n") + 1].splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            if entry.get("retract"):
                taken.pop()
            else:
                taken.append(entry)
        return taken

    def message_ids(self) -> list[str]:
        """
        The C{Message-ID} of every message taken, in order.
        """
        found = []
        for entry in self.received():
            for line in entry["data"].split("\r\n"):
                if line.lower().startswith("message-id:"):
                    found.append(line.split(":", 1)[1].strip())
                    break
        return found


# TLS, as the end-to-end tests look at it.


def peer_fingerprint(client: smtplib.SMTP) -> str:
    """
    The SHA-256 of the certificate the server showed on C{client}'s TLS
    connection.
    """
    sock = client.sock
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def fingerprint_of(cert: Path) -> str:
    """
    The SHA-256 of the (first) certificate in a PEM file.
    """
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def unverified() -> ssl.SSLContext:
    """
    A client context that checks nothing (to look at what the server shows).
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
