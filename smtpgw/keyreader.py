"""
Reading the TLS certificate and key again after privileges were dropped.

A gateway started as root with C{--uid/--gid} reads C{--tls-cert} and
C{--tls-key} as root, then runs as the gateway's user, who may not read
them (a key is commonly C{0600 root}). To reload them on C{SIGHUP} it asks
a helper it started while still root (C{python -m smtpgw.keyreader CERT
KEY}), which keeps root's rights and does one thing: on request, it reads
one of the two files it was given at start, and writes its bytes back. It
reads nothing else, listens on nothing, and ends with the gateway (the end
of its standard input, and C{PR_SET_PDEATHSIG}).

The protocol, on the helper's standard input and output: a request is the
index of the file (C{0} or C{1}) and a newline; the answer is C{+} or C{-}
(read, or refused), a 4-byte big-endian length, and the file's bytes or
the reason it could not be read.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Sequence
from typing import IO, BinaryIO

from twisted.python.filepath import FilePath

from smtpgw.tls import TLSConfigError

__all__ = ["ANSWER_TIMEOUT", "MAX_FILE", "PrivilegedReader", "main"]

#: The largest file the helper sends (a certificate chain is a few KiB).
MAX_FILE = 1024 * 1024
#: How long the gateway waits for an answer before giving up on a reload.
ANSWER_TIMEOUT = 5.0

_LENGTH = struct.Struct(">I")


def _answer(out: BinaryIO, ok: bool, payload: bytes) -> None:
    out.write((b"+" if ok else b"-") + _LENGTH.pack(len(payload)) + payload)
    out.flush()


def _read_file(path: str) -> tuple[bool, bytes]:
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_FILE + 1)
    except OSError as error:
        return False, (error.strerror or str(error)).encode("utf-8", "replace")
    if len(data) > MAX_FILE:
        return False, f"larger than {MAX_FILE} bytes".encode()
    return True, data


def main(argv: Sequence[str] | None = None) -> int:
    """
    Serve read requests for the files named in C{argv} until standard input
    ends.
    """
    argv = sys.argv if argv is None else argv
    paths = list(argv[1:])
    # A SIGHUP or Ctrl-C for the whole process group is for the gateway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parent = os.environ.get("SMTPGW_KEYREADER_PARENT")
    if parent is not None:
        from smtpgw.acceptors import parent_death_signal

        parent_death_signal(int(parent))
    requests, out = sys.stdin.buffer, sys.stdout.buffer
    while line := requests.readline(16):
        try:
            index = int(line.strip())
            path = paths[index]
        except (ValueError, IndexError):
            _answer(out, False, b"no such file")
            continue
        _answer(out, *_read_file(path))
    return 0


class PrivilegedReader:
    """
    The gateway's side: starts the helper (while still root) and asks it
    for the files' bytes; a reader for L{smtpgw.tls.ReloadableTLS}.
    """

    def __init__(self, paths: Sequence[FilePath[str]], *, timeout: float = ANSWER_TIMEOUT) -> None:
        """
        Start the helper, with this process's privileges.

        @param paths: the files it may read.
        @param timeout: see L{ANSWER_TIMEOUT}.
        """
        self._paths = [path.path for path in paths]
        self._timeout = timeout
        environment = dict(os.environ, SMTPGW_KEYREADER_PARENT=str(os.getpid()))
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "smtpgw.keyreader", *self._paths],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environment,
            close_fds=True,
        )

    @property
    def pid(self) -> int | None:
        """
        The helper's process id, while it is meant to run.
        """
        return None if self._process is None else self._process.pid

    def read(self, path: FilePath[str], what: str) -> bytes:
        """
        The bytes of C{path}, read by the helper.

        @param what: what the file should hold, for the message.
        @raise TLSConfigError: when the file cannot be read, or the helper
            does not answer within the timeout (it is then stopped).
        """
        process = self._process
        if path.path not in self._paths or process is None:
            raise TLSConfigError(f"cannot read TLS {what} file {path.path}: not given at start")
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            process.stdin.write(b"%d\n" % self._paths.index(path.path))
            process.stdin.flush()
            ok = self._exactly(process.stdout, 1) == b"+"
            (length,) = _LENGTH.unpack(self._exactly(process.stdout, _LENGTH.size))
            if length > MAX_FILE:
                raise OSError(f"an answer of {length} bytes")
            payload = self._exactly(process.stdout, length)
        except OSError as error:
            # Its answers can no longer be matched to requests.
            self.stop()
            raise TLSConfigError(
                f"cannot read TLS {what} file {path.path}: the privileged reader failed ({error})"
            ) from None
        if not ok:
            reason = payload.decode("utf-8", "replace")
            raise TLSConfigError(f"cannot read TLS {what} file {path.path}: {reason}")
        return payload

    def _exactly(self, stream: IO[bytes], size: int) -> bytes:
        data = b""
        while len(data) < size:
            ready, _, _ = select.select([stream], [], [], self._timeout)
            if not ready:
                raise OSError(f"no answer within {self._timeout:g} s")
            chunk = os.read(stream.fileno(), size - len(data))
            if not chunk:
                raise OSError("it ended")
            data += chunk
        return data

    def stop(self) -> None:
        """
        End the helper (the end of its input, then SIGKILL if it lingers).
        """
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        assert process.stdout is not None
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(self._timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
