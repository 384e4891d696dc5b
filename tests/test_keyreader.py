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

import pytest
from twisted.python.filepath import FilePath

from smtpgw.keyreader import MAX_FILE, PrivilegedReader
from smtpgw.tls import ReloadableTLS, TLSConfigError, ensure_self_signed


@pytest.fixture
def files(tmp_path: Path) -> tuple[FilePath[str], FilePath[str]]:
    return ensure_self_signed(str(tmp_path), "gw.example")


@pytest.fixture
def reader(files: tuple[FilePath[str], FilePath[str]]) -> Iterator[PrivilegedReader]:
    made = PrivilegedReader(files, timeout=10)
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
    assert len(reader.read(key, "key")) == MAX_FILE
    key.setContent(b"k" * (MAX_FILE + 1))
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
    with pytest.raises(TLSConfigError, match="not given at start"):
        reader.read(cert, "certificate")


def test_a_silent_helper_times_out(
    files: tuple[FilePath[str], FilePath[str]],
) -> None:
    """
    A helper that does not answer (stopped) fails the read after the
    timeout, and is ended.
    """
    made = PrivilegedReader(files, timeout=0.2)
    pid = made.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(TLSConfigError, match=r"no answer within 0\.2 s"):
            made.read(files[0], "certificate")
        assert made.pid is None
    finally:
        made.stop()
        # SIGKILL ends a stopped process too; nothing is left to reap.
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_helper_ends_with_its_input(files: tuple[FilePath[str], FilePath[str]]) -> None:
    """
    Stopping closes the helper's input: it exits by itself, with status 0.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "smtpgw.keyreader", files[0].path, files[1].path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    out, _ = process.communicate(b"0\n7\nx\n", timeout=30)
    assert process.returncode == 0
    assert out.startswith(b"+")
    assert out.endswith(b"-\x00\x00\x00\x0cno such file-\x00\x00\x00\x0cno such file")


def test_reloadable_tls_reloads_through_its_reader(
    files: tuple[FilePath[str], FilePath[str]], tmp_path: Path
) -> None:
    """
    A reload reads the files with the reader given (here, one that serves
    another pair): what it returns is what new connections get.
    """
    cert, key = files
    other_cert, other_key = ensure_self_signed(str(tmp_path / "other"), "other.example")
    served = {cert.path: cert.getContent(), key.path: key.getContent()}
    asked: list[str] = []

    def reader(path: FilePath[str], what: str) -> bytes:
        asked.append(what)
        return served[path.path]

    tls = ReloadableTLS(cert, key, reader=reader)
    assert asked == ["certificate", "key"]
    served = {cert.path: other_cert.getContent(), key.path: other_key.getContent()}
    assert tls.reload()
    assert tls.pem == (served[cert.path], served[key.path])
    assert asked == ["certificate", "key"] * 2
