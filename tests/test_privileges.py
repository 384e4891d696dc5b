"""
Binding a privileged port as root, then running as C{--uid/--gid}, through
the real C{twistd}.

These tests need root. They skip without it, except when C{CI=true}: there
the privilege drop must be tested, so a missing root is a failure.
"""

from __future__ import annotations

import grp
import os
import pwd
import selectors
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.root_support import need_root

ROOT = Path(__file__).resolve().parent.parent

TAC = """
import os
from twisted.application.service import Application, Service
from twisted.internet import reactor
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from smtpgw.listening import MultiPortListener


class WhoAmI(Protocol):
    def connectionMade(self):
        self.transport.write(
            f"uid={os.geteuid()} gid={os.getegid()} pid={os.getpid()}\\r\\n".encode()
        )
        self.transport.loseConnection()


class BindAfterDrop(MultiPortListener):
    def privilegedStartService(self):
        pass


class Ready(Service):
    def startService(self):
        super().startService()
        data_dir = os.environ["TEST_DATA_DIR"]
        with open(os.path.join(data_dir, "written-after-drop"), "w") as stream:
            stream.write(str(os.geteuid()))
        Logger().info("test-ready as uid {uid}", uid=os.geteuid())


application = Application("privileges-test")
listener_class = BindAfterDrop if os.environ.get("TEST_BIND_LATE") else MultiPortListener
listener_class(
    reactor,
    [int(os.environ["TEST_PORT"])],
    "127.0.0.1",
    ServerFactory.forProtocol(WhoAmI),
).setServiceParent(application)
Ready().setServiceParent(application)
"""

READY_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _need_root() -> None:
    """
    Skip without root, or fail when C{CI=true}.
    """
    need_root("binding a port below 1024 and dropping to --uid/--gid needs root")


@pytest.fixture
def nobody() -> tuple[int, int]:
    """
    The unprivileged user and group to drop to.
    """
    user = pwd.getpwnam("nobody")
    for group in ("nogroup", "nobody"):
        try:
            return user.pw_uid, grp.getgrnam(group).gr_gid
        except KeyError:
            continue
    return user.pw_uid, user.pw_gid


@pytest.fixture
def data_dir(nobody: tuple[int, int]) -> Iterator[Path]:
    """
    A data directory the dropped user owns. pytest's C{tmp_path} is private
    to root, so this one lives directly under the system temporary directory.
    """
    path = Path(tempfile.mkdtemp(prefix="smtpgw-privileges-"))
    os.chown(path, *nobody)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def privileged_free_port() -> int:
    """
    @return: a port below 1024 free on 127.0.0.1 a moment ago, preferring the
        mail ports.
    """
    candidates: list[int] = [25, 587, 26, 23, *range(1000, 0, -1)]
    for port in candidates:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no port below 1024 is free on 127.0.0.1")


def start_twistd(
    tac: Path, data_dir: Path, port: int, nobody: tuple[int, int], *, bind_late: bool
) -> subprocess.Popen[bytes]:
    """
    Start C{twistd -n --uid --gid -y tac} in the foreground.
    """
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        # Lines must reach the test as they are logged, not at exit.
        "PYTHONUNBUFFERED": "1",
        "TEST_PORT": str(port),
        "TEST_DATA_DIR": str(data_dir),
    }
    if bind_late:
        env["TEST_BIND_LATE"] = "1"
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logfile=-",
            f"--uid={nobody[0]}",
            f"--gid={nobody[1]}",
            "-y",
            str(tac),
        ],
        cwd=data_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def read_until(process: subprocess.Popen[bytes], marker: str) -> str:
    """
    Read the process's output until it contains C{marker}, the process
    closes its output, or L{READY_TIMEOUT} passes.

    Reads the descriptor directly: a buffered reader could hold the marker
    line while the selector waits for more.

    @return: the output so far.
    """
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    output = b""
    deadline = time.monotonic() + READY_TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        while marker.encode() not in output and time.monotonic() < deadline:
            if not selector.select(timeout=deadline - time.monotonic()):
                break
            chunk = os.read(descriptor, 65536)
            if not chunk:
                break
            output += chunk
    return output.decode(errors="replace")


def proc_ids(pid: int, field: str) -> list[int]:
    """
    @return: the real, effective, saved and filesystem ids from
        C{/proc/<pid>/status}.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return [int(value) for value in line.split()[1:]]
    raise AssertionError(f"no {field} line for {pid}")


def stop(process: subprocess.Popen[bytes]) -> str:
    """
    Stop the twistd we started (by its pid) and collect the rest of its
    output.
    """
    if process.poll() is None:
        process.terminate()
    try:
        rest, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        rest, _ = process.communicate()
    return rest.decode(errors="replace")


def test_binds_privileged_port_as_root_then_runs_as_nobody(
    tmp_path: Path, data_dir: Path, nobody: tuple[int, int]
) -> None:
    """
    Under C{twistd --uid/--gid}, the listener binds a port below 1024 before
    privileges are shed; afterwards the process runs as the given user and
    group only, serves on that port, and can write to its data directory.
    """
    tac = tmp_path / "privileges.tac"
    tac.write_text(textwrap.dedent(TAC))
    port = privileged_free_port()
    process = start_twistd(tac, data_dir, port, nobody, bind_late=False)
    output = ""
    try:
        output = read_until(process, "test-ready")
        assert "test-ready" in output, output
        assert "listening on 1 of 1 ports of 127.0.0.1" in output

        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            reply = client.makefile("rb").readline()
        assert reply == f"uid={nobody[0]} gid={nobody[1]} pid={process.pid}\r\n".encode()

        assert proc_ids(process.pid, "Uid") == [nobody[0]] * 4
        assert proc_ids(process.pid, "Gid") == [nobody[1]] * 4
        written = data_dir / "written-after-drop"
        assert written.read_text() == str(nobody[0])
        assert written.stat().st_uid == nobody[0]
    finally:
        output += stop(process)
    # twistd shuts down cleanly, then ends itself with the signal it got.
    assert process.returncode == -signal.SIGTERM, output
    assert "Server Shut Down." in output


def test_control_binding_after_the_drop_is_refused(
    tmp_path: Path, data_dir: Path, nobody: tuple[int, int]
) -> None:
    """
    Control: a listener that binds only in startService, after the drop,
    cannot get the port below 1024; twistd reports the port and reason and
    exits non-zero. So the test above passes because of
    privilegedStartService, not because this machine lets anyone bind it.
    """
    unprivileged_start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    port = privileged_free_port()
    if port >= unprivileged_start:
        pytest.skip(f"ports from {unprivileged_start} up are bindable by anyone here")
    tac = tmp_path / "privileges.tac"
    tac.write_text(textwrap.dedent(TAC))
    process = start_twistd(tac, data_dir, port, nobody, bind_late=True)
    try:
        process.wait(timeout=READY_TIMEOUT)
    finally:
        output = stop(process)
    assert process.returncode != 0, output
    assert f"cannot listen on port {port} of 127.0.0.1: Permission denied" in output
    assert "NoPortBound" in output
    assert not (data_dir / "written-after-drop").exists()


def _uid_of(pid: int) -> int:
    return proc_ids(pid, "Uid")[0]


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_the_gateway_run_as_nobody_reloads_a_root_only_key_on_sighup(
    data_dir: Path, nobody: tuple[int, int], daemon: bool
) -> None:
    """
    The real gateway, started as root with C{--uid/--gid} and a certificate
    and key only root can read (0600 in a 0700 directory), serves STARTTLS
    with them as the dropped user; after the files are replaced and SIGHUP
    sent, new connections get the new certificate (read by the helper that
    kept root's rights, a child of the process that serves: also when
    twistd daemonized), with no failed reload; the helper ends with the
    gateway.
    """
    from smtpgw.tls import ensure_self_signed
    from tests.gateway_process import (
        Gateway,
        fingerprint_of,
        free_port,
        peer_fingerprint,
        unverified,
        wait_until,
    )

    secrets = Path(tempfile.mkdtemp(prefix="smtpgw-keys-"))
    try:
        first = ensure_self_signed(str(secrets / "a"), "first.test")
        second = ensure_self_signed(str(secrets / "b"), "second.test")
        live_cert, live_key = secrets / "live.crt", secrets / "live.key"
        for source, target in zip(first, (live_cert, live_key), strict=True):
            target.write_bytes(source.getContent())
            target.chmod(0o600)
        assert secrets.stat().st_mode & 0o777 == 0o700
        gw = Gateway(
            data_dir,
            free_port(),
            extra_args=("--tls-cert", str(live_cert), "--tls-key", str(live_key)),
            twistd_args=(f"--uid={nobody[0]}", f"--gid={nobody[1]}"),
        )
        log = data_dir / "twistd.log"
        if daemon:
            pidfile = data_dir / "twistd.pid"
            argv = gw.argv()
            argv.remove("-n")
            argv[argv.index("--pidfile=")] = f"--pidfile={pidfile}"
            argv.insert(1, f"--logfile={log}")
            # The launcher returns once twistd has daemonized.
            subprocess.run(argv, check=True, timeout=60, stdin=subprocess.DEVNULL)
            wait_until(pidfile.exists, 30, "the pid file")
            main = int(pidfile.read_text())
        else:
            gw.start()
            assert gw.process is not None
            main = gw.process.pid
            log = gw.log_path

        def served() -> str:
            with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
                client.starttls(context=unverified())
                return peer_fingerprint(client)

        helper: list[int] = []
        try:
            wait_until(lambda: served() == fingerprint_of(live_cert), 30, "the first certificate")
            assert _uid_of(main) == nobody[0]
            children = Path(f"/proc/{main}/task/{main}/children").read_text().split()
            helper = [
                int(pid)
                for pid in children
                if b"smtpgw.keyreader" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            assert len(helper) == 1
            assert _uid_of(helper[0]) == 0
            for source, target in zip(second, (live_cert, live_key), strict=True):
                target.write_bytes(source.getContent())
            os.kill(main, signal.SIGHUP)
            wanted = fingerprint_of(live_cert)
            wait_until(lambda: served() == wanted, 15, "the new certificate")
            text = log.read_text(errors="replace")
            assert "TLS reload failed" not in text
            assert "TLS certificate reloaded" in text
        finally:
            if daemon:
                os.kill(main, signal.SIGTERM)
                gone = Path(f"/proc/{main}")
                wait_until(lambda: not gone.exists(), 30, "the daemon to stop")
            else:
                assert gw.stop(), gw.log_tail()
        helper_proc = Path(f"/proc/{helper[0]}")
        wait_until(lambda: not helper_proc.exists(), 10, "the helper to end")
    finally:
        shutil.rmtree(secrets)
