"""
Reading the TLS certificate and key again after privileges were dropped.

A gateway started as root with C{--uid/--gid} reads C{--tls-cert} and
C{--tls-key} as root, then runs as the gateway's user, who may not read
them (a key is commonly C{0600 root}). To reload them on C{SIGHUP} it asks
a helper it started while still root (C{python -I -m smtpgw.keyreader CERT
KEY}, from C{/}, with an empty environment), which keeps root's rights and
does one thing: on request, it reads one of the two files it was given at
start, and writes its bytes back. It reads nothing else, listens on
nothing, and ends with the gateway (the end of its standard input, and
C{PR_SET_PDEATHSIG}).

The gateway's user holds the helper's input, so the helper trusts nothing
it could change: it resolves the path one name at a time from C{/}, and
goes through a directory only when root owns it and others cannot write to
it (a directory with the sticky bit, such as C{/tmp}, is fine: no one can
replace root's entries in it); it follows a symbolic link only from such a
directory, and reads only a regular file root owns and others cannot
write. A symbolic link placed by the gateway's user in the way cannot make
it read C{/etc/shadow}; a named pipe cannot make it wait.

The protocol, on the helper's standard input and output: a request is the
index of the file (C{0} or C{1}) and a newline; the answer is C{+} or C{-}
(read, or refused), a 4-byte big-endian length, and the file's bytes or
the reason it could not be read.

The helper imports only the standard library (and L{smtpgw.processes}).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any, BinaryIO

__all__ = ["ANSWER_TIMEOUT", "MAX_FILE", "MAX_LINKS", "PrivilegedReader", "main", "safe_to_read"]

#: The largest file the helper sends (a certificate chain is a few KiB).
MAX_FILE = 1024 * 1024
#: How long the gateway waits for an answer before giving up on a reload.
ANSWER_TIMEOUT = 5.0
#: How long it waits for a helper it killed to end.
KILL_WAIT = 0.5

_LENGTH = struct.Struct(">I")


def _answer(out: BinaryIO, ok: bool, payload: bytes) -> None:
    out.write((b"+" if ok else b"-") + _LENGTH.pack(len(payload)) + payload)
    out.flush()


def _trusted(info: os.stat_result, directory: bool) -> bool:
    if info.st_uid != 0:
        return False
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) == 0:
        return True
    # Others may add entries to a sticky directory, never replace root's.
    return directory and bool(info.st_mode & stat.S_ISVTX)


def _shared(info: os.stat_result) -> bool:
    # A sticky directory others may write to (as /tmp).
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


#: The most symbolic links followed while resolving one path.
MAX_LINKS = 40

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _error(error: OSError) -> tuple[bool, bytes]:
    return False, (error.strerror or str(error)).encode("utf-8", "replace")


def safe_to_read(path: str) -> tuple[bool, bytes]:
    """
    Read C{path} as the helper does: only a regular file that root owns
    and nobody else can write, reached through directories only root can
    change.

    The path is resolved one name at a time from C{/}, each directory
    checked before a name is looked up in it, so nothing a user other than
    root may change decides where a name leads: a symbolic link is
    followed only from a directory that passed (and, in a sticky directory
    others may write to, only when root owns the link), the last name is
    opened without following a link, and a file in such a sticky directory
    must have no other hard link.

    @return: whether it was read, and its bytes or why not.
    """
    if not path.startswith("/"):
        return False, b"not an absolute path"
    try:
        fd = os.open("/", _DIRECTORY)
    except OSError as error:
        return _error(error)
    try:
        return _walk(fd, path)
    finally:
        os.close(fd)


def _walk(root: int, path: str) -> tuple[bool, bytes]:
    fds = [root]
    try:
        fd = root
        info = os.fstat(fd)
        if not _trusted(info, directory=True):
            return False, b"/ may be changed by a user other than root"
        shared = _shared(info)
        names = [name for name in path.split("/") if name not in ("", ".")]
        links = 0
        while names:
            name = names.pop(0)
            try:
                found = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError as error:
                return _error(error)
            if stat.S_ISLNK(found.st_mode):
                links += 1
                if links > MAX_LINKS or (shared and found.st_uid != 0):
                    return False, f"{name}: a link root does not vouch for".encode()
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    fd = os.open("/", _DIRECTORY)
                    fds.append(fd)
                    info = os.fstat(fd)
                    shared = _shared(info)
                names[:0] = [part for part in target.split("/") if part not in ("", ".")]
                continue
            if names or name == "..":
                try:
                    fd = os.open(name, _DIRECTORY, dir_fd=fd)
                except OSError as error:
                    return _error(error)
                fds.append(fd)
                info = os.fstat(fd)
                if not _trusted(info, directory=True):
                    return False, f"{name}/ may be changed by a user other than root".encode()
                shared = _shared(info)
                continue
            return _read_last(fd, name, shared)
        return False, b"not a regular file"
    finally:
        for opened in fds[1:]:
            os.close(opened)


def _read_last(directory: int, name: str, shared: bool) -> tuple[bool, bytes]:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=directory)
    except OSError as error:
        return _error(error)
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False, b"not a regular file"
        if not _trusted(info, directory=False) or (shared and info.st_nlink != 1):
            return False, b"the file may be changed by a user other than root"
        data = stream.read(MAX_FILE + 1)
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
        from smtpgw.processes import parent_death_signal

        parent_death_signal(int(parent))
    requests, out = sys.stdin.buffer, sys.stdout.buffer
    while line := requests.readline(16):
        text = line.strip()
        if not text.isdigit() or int(text) >= len(paths):
            _answer(out, False, b"no such file")
            continue
        _answer(out, *safe_to_read(paths[int(text)]))
    return 0


class PrivilegedReader:
    """
    The gateway's side: starts the helper (while still root) and asks it
    for the files' bytes; a reader for L{smtpgw.tls.ReloadableTLS}.
    """

    def __init__(self, paths: Sequence[Any], *, timeout: float = ANSWER_TIMEOUT) -> None:
        """
        @param paths: the files the helper may read (L{FilePath}s).
        @param timeout: see L{ANSWER_TIMEOUT}.
        """
        self._paths: list[str] = [path.path for path in paths]
        self._timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None
        # Killed helpers that had not ended yet.
        self._dying: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """
        Start the helper, with this process's privileges: call it while
        still root, in the process that goes on running (after twistd has
        daemonized: the helper ends with the process that started it).
        """
        if self._process is not None:
            return
        self._process = subprocess.Popen(
            # Isolated (-I): no PYTHON* variables, no user site, and not
            # the current directory first on the path, from /: nothing the
            # gateway's user may write decides what code root runs.
            [sys.executable, "-I", "-m", "smtpgw.keyreader", *self._paths],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd="/",
            env={"SMTPGW_KEYREADER_PARENT": str(os.getpid())},
            close_fds=True,
        )

    @property
    def pid(self) -> int | None:
        """
        The helper's process id, while it is meant to run.
        """
        return None if self._process is None else self._process.pid

    def read(self, path: Any, what: str) -> bytes:
        """
        The bytes of C{path} (a L{FilePath}), read by the helper.

        @param what: what the file should hold, for the message.
        @raise smtpgw.tls.TLSConfigError: when the file cannot be read, or
            the helper does not answer within the timeout (it is then
            killed).
        """
        from smtpgw.tls import TLSConfigError

        process = self._process
        if path.path not in self._paths:
            raise TLSConfigError(f"cannot read TLS {what} file {path.path}: not given at start")
        if process is None:
            raise TLSConfigError(
                f"cannot read TLS {what} file {path.path}: the privileged reader is not running"
            )
        assert process.stdin is not None
        assert process.stdout is not None
        deadline = time.monotonic() + self._timeout
        try:
            process.stdin.write(b"%d\n" % self._paths.index(path.path))
            process.stdin.flush()
            ok = self._exactly(process.stdout, 1, deadline) == b"+"
            (length,) = _LENGTH.unpack(self._exactly(process.stdout, _LENGTH.size, deadline))
            if length > MAX_FILE:
                raise OSError(f"an answer of {length} bytes")
            payload = self._exactly(process.stdout, length, deadline)
        except (OSError, ValueError) as error:
            # Its answers can no longer be matched to requests. (ValueError:
            # its pipes were closed by a stop, as the gateway ends, while a
            # reload read in another thread.)
            self._kill()
            raise TLSConfigError(
                f"cannot read TLS {what} file {path.path}: the privileged reader failed ({error})"
            ) from None
        if not ok:
            reason = payload.decode("utf-8", "replace")
            raise TLSConfigError(f"cannot read TLS {what} file {path.path}: {reason}")
        return payload

    def _exactly(self, stream: IO[bytes], size: int, deadline: float) -> bytes:
        data = b""
        while len(data) < size:
            left = deadline - time.monotonic()
            ready = select.select([stream], [], [], left)[0] if left > 0 else []
            if not ready:
                raise OSError(f"no answer within {self._timeout:g} s")
            chunk = os.read(stream.fileno(), size - len(data))
            if not chunk:
                raise OSError("it ended")
            data += chunk
        return data

    def _kill(self) -> None:
        # Waits half a second at most: a helper stuck in the kernel must
        # not hold the reactor (stop() reaps it if it ended by then).
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            process.kill()
        self._close(process)
        try:
            process.wait(KILL_WAIT)
        except subprocess.TimeoutExpired:
            self._dying.append(process)

    def stop(self) -> None:
        """
        End the helper: the end of its input, then SIGKILL if it has not
        ended within a second.
        """
        dying, self._dying = self._dying, []
        for killed in dying:
            with contextlib.suppress(subprocess.TimeoutExpired):
                killed.wait(KILL_WAIT)
        process, self._process = self._process, None
        if process is None:
            return
        self._close(process)
        try:
            process.wait(1.0)
        except subprocess.TimeoutExpired:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(1.0)

    @staticmethod
    def _close(process: subprocess.Popen[bytes]) -> None:
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


if __name__ == "__main__":
    sys.exit(main())
