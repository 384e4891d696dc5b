"""
L{smtpgw.keyreader}: the helper that reads the TLS files for a gateway
that has dropped its privileges, and the gateway's side of it.

The helper runs for real (C{python -m smtpgw.keyreader}), as the user
running the tests; the privilege drop itself is tested in
C{tests/test_privileges.py}.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.python.filepath import FilePath

from smtpgw.keyreader import MAX_FILE, PrivilegedReader, safe_to_read
from smtpgw.tls import ReloadableTLS, TLSConfigError, ensure_self_signed
from tests.gateway_process import wait_until
from tests.root_support import need_root
from tests.twisted_support import async_test, global_reactor


@pytest.fixture
def as_root() -> None:
    """
    The helper reads only files root owns: tests that read through it need
    root. They skip without it, except when C{CI=true}.
    """
    need_root("the key reader reads only root's files: this test needs root")


@pytest.fixture
def files(tmp_path: Path) -> tuple[FilePath[str], FilePath[str]]:
    return ensure_self_signed(str(tmp_path), "gw.example")


@pytest.fixture
def reader(
    files: tuple[FilePath[str], FilePath[str]], as_root: None
) -> Iterator[PrivilegedReader]:
    made = PrivilegedReader(files, timeout=10)
    made.start()
    try:
        yield made
    finally:
        made.stop()


def test_it_reads_the_files_it_was_given(
    reader: PrivilegedReader, files: tuple[FilePath[str], FilePath[str]]
) -> None:
    """
    Each file given at start is read, as often as asked, with its current
    bytes.
    """
    cert, key = files
    assert reader.read(cert, "certificate") == cert.getContent()
    assert reader.read(key, "key") == key.getContent()
    key.setContent(b"changed")
    key.chmod(0o600)
    assert reader.read(key, "key") == b"changed"


def test_a_file_not_given_at_start_is_refused_without_asking(
    reader: PrivilegedReader, tmp_path: Path
) -> None:
    """
    Only the files given at start can be read through the helper.
    """
    other = FilePath(str(tmp_path / "other.pem"))
    other.setContent(b"secret")
    with pytest.raises(TLSConfigError, match="not given at start"):
        reader.read(other, "key")


def test_a_missing_file_is_a_clear_error_and_the_helper_goes_on(
    reader: PrivilegedReader, files: tuple[FilePath[str], FilePath[str]]
) -> None:
    """
    A file that cannot be read gives the reason, and the next request is
    answered.
    """
    cert, key = files
    saved = key.getContent()
    key.remove()
    with pytest.raises(TLSConfigError, match="No such file or directory"):
        reader.read(key, "key")
    key.setContent(saved)
    key.chmod(0o600)
    assert reader.read(key, "key") == saved
    assert reader.read(cert, "certificate") == cert.getContent()


def test_a_file_over_the_limit_is_refused(
    reader: PrivilegedReader, files: tuple[FilePath[str], FilePath[str]]
) -> None:
    """
    A file of MAX_FILE bytes is read; one byte more is refused.
    """
    _, key = files
    key.setContent(b"k" * MAX_FILE)
    key.chmod(0o600)
    assert len(reader.read(key, "key")) == MAX_FILE
    key.setContent(b"k" * (MAX_FILE + 1))
    key.chmod(0o600)
    with pytest.raises(TLSConfigError, match=f"larger than {MAX_FILE} bytes"):
        reader.read(key, "key")


def test_a_dead_helper_is_an_error_not_a_hang(
    reader: PrivilegedReader, files: tuple[FilePath[str], FilePath[str]]
) -> None:
    """
    When the helper is gone, a read fails at once with a clear error, and
    later reads fail the same way.
    """
    cert, _ = files
    pid = reader.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TLSConfigError, match="privileged reader failed"):
        reader.read(cert, "certificate")
    assert reader.pid is None
    with pytest.raises(TLSConfigError, match="the privileged reader is not running"):
        reader.read(cert, "certificate")


def test_nothing_runs_before_start(files: tuple[FilePath[str], FilePath[str]]) -> None:
    """
    Made, the reader starts no process until start() (called as root after
    twistd daemonized); a read before that is a clear error.
    """
    made = PrivilegedReader(files)
    assert made.pid is None
    with pytest.raises(TLSConfigError, match="the privileged reader is not running"):
        made.read(files[0], "certificate")
    made.stop()


def test_a_silent_helper_times_out(
    files: tuple[FilePath[str], FilePath[str]], as_root: None
) -> None:
    """
    A helper that does not answer (stopped) fails the read after the
    timeout, and is ended.
    """
    made = PrivilegedReader(files, timeout=0.2)
    made.start()
    pid = made.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(TLSConfigError, match=r"no answer within 0\.2 s"):
            made.read(files[0], "certificate")
        assert made.pid is None
    finally:
        made.stop()
        # SIGKILL ends a stopped process too, and stop() reaps it.
        gone = Path(f"/proc/{pid}")
        wait_until(lambda: not gone.exists(), 10, "the killed helper to be reaped")


def test_a_stop_while_a_thread_reads_is_a_clear_error(
    files: tuple[FilePath[str], FilePath[str]],
    as_root: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    A reload reads in a thread; when the gateway ends meanwhile, stop()
    closes the helper's pipes under that read. The read fails with a clear
    error (not a stray ValueError of a closed file).
    """
    made = PrivilegedReader(files, timeout=10)
    made.start()
    exactly = made._exactly

    def stopped_first(*args: Any) -> bytes:
        made.stop()
        return exactly(*args)

    monkeypatch.setattr(made, "_exactly", stopped_first)
    with pytest.raises(TLSConfigError, match="privileged reader failed"):
        made.read(files[0], "certificate")
    assert made.pid is None


def test_the_helper_ends_with_its_input(
    files: tuple[FilePath[str], FilePath[str]], as_root: None
) -> None:
    """
    The helper answers each request in order, refuses an index that names
    no file given (past the end, negative, not a number), and exits by
    itself, with status 0, at the end of its input.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "smtpgw.keyreader", files[0].path, files[1].path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    out, _ = process.communicate(b"1\n2\n-1\nx\n", timeout=30)
    assert process.returncode == 0
    key = files[1].getContent()
    refused = b"-\x00\x00\x00\x0cno such file"
    assert out == b"+" + len(key).to_bytes(4, "big") + key + refused * 3


def test_a_file_through_a_link_in_root_directories_is_read(tmp_path: Path, as_root: None) -> None:
    """
    A certificate reached through a symbolic link (certbot's live/ links
    into archive/) is read when every directory on the resolved path and
    the file are root's alone.
    """
    archive = tmp_path / "archive"
    archive.mkdir(mode=0o700)
    target = archive / "cert1.pem"
    target.write_bytes(b"chain")
    target.chmod(0o644)
    link = tmp_path / "live.pem"
    link.symlink_to(target)
    assert safe_to_read(str(link)) == (True, b"chain")


def test_a_link_in_a_directory_the_gateway_user_owns_is_not_followed(
    tmp_path: Path, as_root: None
) -> None:
    """
    The attack: the gateway's user owns a directory on the configured path
    and puts there a link to a file only root may read. The helper refuses
    before looking the name up, whatever the link leads to.
    """
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    owned = tmp_path / "owned"
    owned.mkdir(mode=0o755)
    (owned / "key.pem").symlink_to(secret)
    assert safe_to_read(str(owned / "key.pem")) == (True, b"root only")
    os.chown(owned, 65534, 65534)
    ok, why = safe_to_read(str(owned / "key.pem"))
    assert not ok
    assert b"owned/ may be changed by a user other than root" in why
    # Nor through a link that leads into it from a root directory.
    (tmp_path / "via").symlink_to(owned)
    assert safe_to_read(str(tmp_path / "via" / "key.pem"))[0] is False


def test_in_a_sticky_directory_only_root_s_links_and_single_links_count(
    tmp_path: Path, as_root: None
) -> None:
    """
    In a directory others may write to (sticky, as /tmp), a link is
    followed only when root owns it, and a file is read only when it has no
    other hard link (one made there could lead anywhere).
    """
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    link = shared / "link.pem"
    link.symlink_to(secret)
    assert safe_to_read(str(link)) == (True, b"root only")
    os.lchown(link, 65534, 65534)
    ok, why = safe_to_read(str(link))
    assert not ok
    assert b"a link root does not vouch for" in why
    hard = shared / "hard.pem"
    os.link(secret, hard)
    assert safe_to_read(str(hard))[0] is False
    os.unlink(hard)
    alone = shared / "alone.pem"
    alone.write_bytes(b"alone")
    alone.chmod(0o600)
    assert safe_to_read(str(alone)) == (True, b"alone")


def test_a_relative_path_and_a_link_loop_are_refused(tmp_path: Path, as_root: None) -> None:
    """
    Only absolute paths are read, and a loop of links ends in a refusal.
    """
    assert safe_to_read("relative/key.pem") == (False, b"not an absolute path")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    ok, why = safe_to_read(str(tmp_path / "a"))
    assert not ok
    assert b"a link root does not vouch for" in why


def test_a_directory_others_may_write_is_refused(tmp_path: Path, as_root: None) -> None:
    """
    A file in a directory writable by others (not sticky) is refused: who
    can write there could put a link to any file in its place. The same
    directory with the sticky bit (as /tmp) is accepted.
    """
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "key.pem").write_bytes(b"key")
    (shared / "key.pem").chmod(0o600)
    shared.chmod(0o777)
    ok, why = safe_to_read(str(shared / "key.pem"))
    assert not ok
    assert b"may be changed by a user other than root" in why
    shared.chmod(0o1777)
    assert safe_to_read(str(shared / "key.pem")) == (True, b"key")


def test_a_file_others_may_write_or_own_is_refused(tmp_path: Path, as_root: None) -> None:
    """
    A file group- or world-writable, or owned by another user, is refused.
    """
    path = tmp_path / "key.pem"
    path.write_bytes(b"key")
    path.chmod(0o620)
    assert safe_to_read(str(path))[0] is False
    path.chmod(0o600)
    assert safe_to_read(str(path)) == (True, b"key")
    os.chown(path, 65534, -1)
    ok, why = safe_to_read(str(path))
    assert not ok
    assert b"other than root" in why


def test_a_named_pipe_is_refused_without_waiting(tmp_path: Path, as_root: None) -> None:
    """
    A named pipe in place of a file is refused at once (opening it for
    reading would wait for a writer).
    """
    fifo = tmp_path / "key.pem"
    os.mkfifo(fifo, 0o600)
    assert safe_to_read(str(fifo)) == (False, b"not a regular file")


@async_test
async def test_reloadable_tls_reloads_through_its_reader(
    files: tuple[FilePath[str], FilePath[str]], tmp_path: Path
) -> None:
    """
    A reload reads the files with the reader given (here, one that serves
    another pair): what it returns is what new connections get. The first
    load, at start (as root), reads the files itself.
    """
    cert, key = files
    other_cert, other_key = ensure_self_signed(str(tmp_path / "other"), "other.example")
    served = {cert.path: cert.getContent(), key.path: key.getContent()}
    asked: list[str] = []

    def reader(path: FilePath[str], what: str) -> bytes:
        asked.append(what)
        return served[path.path]

    tls = ReloadableTLS(cert, key, reader=reader)
    assert asked == []
    assert tls.pem == (cert.getContent(), key.getContent())
    served = {cert.path: other_cert.getContent(), key.path: other_key.getContent()}
    assert await tls.reload_in_thread(global_reactor()) is True
    assert tls.pem == (served[cert.path], served[key.path])
    assert asked == ["certificate", "key"]
