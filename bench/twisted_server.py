"""
A bare Twisted ESMTP server: the framework's own cost, with no durability.

It authenticates AUTH PLAIN and LOGIN against an in-memory password table (no
bcrypt), offers STARTTLS when given a certificate, accepts every sender and
recipient, and either throws messages away or keeps them in a list (for the
load generator's test). It is the floor under the gateway: what Twisted's SMTP
server costs before journaling, policy and queueing.

    python -m bench.twisted_server --port 2525 [--cert C --key K] [--pipelining]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.internet.ssl import CertificateOptions
from twisted.mail import smtp
from twisted.mail.imap4 import PLAINCredentials
from zope.interface import implementer

from bench.tls import CertFiles


@implementer(smtp.IMessage)
@define
class _Message:
    """
    One message being received: its lines are kept only when a store is given.
    """

    store: list[bytes] | None
    lines: list[bytes] = field(factory=list)

    def lineReceived(self, line: bytes) -> None:
        if self.store is not None:
            self.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        if self.store is not None:
            self.store.append(b"".join(line + b"\r\n" for line in self.lines))
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
@define
class _Delivery:
    """
    Accepts every sender and recipient; adds no Received header, so a kept
    message is exactly what the client sent.
    """

    store: list[bytes] | None

    def receivedHeader(
        self, helo: tuple[bytes, bytes], origin: smtp.Address, recipients: Sequence[smtp.User]
    ) -> None:
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], _Message]:
        return lambda: _Message(self.store)


@implementer(IRealm)
@define
class _Realm:
    store: list[bytes] | None

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, _Delivery, Callable[[], None]]:
        if smtp.IMessageDelivery not in interfaces:
            raise NotImplementedError("only IMessageDelivery")
        return smtp.IMessageDelivery, _Delivery(self.store), lambda: None


class _PipeliningESMTP(smtp.ESMTP):
    """
    Twisted's ESMTP, also advertising PIPELINING: its validators answer at
    once, so pipelined commands are answered in order.
    """

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        extensions: dict[bytes, list[bytes] | None] = super().extensions()
        extensions[b"PIPELINING"] = None
        return extensions


class BareFactory(smtp.SMTPFactory):
    """
    Builds bare ESMTP sessions.
    """

    domain = b"twisted-bare.bench.invalid"

    def __init__(
        self, portal: Portal, tls: CertificateOptions | None = None, pipelining: bool = False
    ) -> None:
        """
        @param portal: the cred portal for AUTH.
        @param tls: the TLS options for STARTTLS, or L{None} for none.
        @param pipelining: whether to advertise PIPELINING.
        """
        super().__init__(portal)
        self.tls = tls
        self.pipelining = pipelining

    def buildProtocol(self, addr: IAddress | None) -> smtp.ESMTP:
        protocol = _PipeliningESMTP() if self.pipelining else smtp.ESMTP()
        protocol.factory = self
        protocol.portal = self.portal
        protocol.host = self.domain
        protocol.timeout = self.timeout
        protocol.challengers = {b"PLAIN": PLAINCredentials, b"LOGIN": smtp.LOGINCredentials}
        protocol.ctx = self.tls
        return protocol


def tls_options(files: CertFiles) -> CertificateOptions:
    """
    @param files: a PEM certificate and key.
    @return: server TLS options for them.
    """
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    # pyOpenSSL wants cryptography objects (its own are deprecated); Twisted's
    # annotations still name the pyOpenSSL types.
    return CertificateOptions(privateKey=cast(Any, key), certificate=cast(Any, cert))


def build_factory(
    users: dict[str, str],
    store: list[bytes] | None = None,
    tls: CertFiles | None = None,
    pipelining: bool = False,
) -> BareFactory:
    """
    @param users: usernames and passwords that may AUTH.
    @param store: where to keep each received message, or L{None} to
        discard them.
    @param tls: a certificate to offer STARTTLS with.
    @param pipelining: whether to advertise PIPELINING.
    @return: the factory to listen with.
    """
    checker = InMemoryUsernamePasswordDatabaseDontUse(
        **{name: password.encode() for name, password in users.items()}
    )
    portal = Portal(_Realm(store), [checker])
    return BareFactory(
        portal=portal,
        tls=None if tls is None else tls_options(tls),
        pipelining=pipelining,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """
    Serve until terminated; print C{listening PORT} once the port is bound.
    """
    parser = argparse.ArgumentParser(description="bare Twisted ESMTP server (bench)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password", default="bench")
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--pipelining", action="store_true")
    args = parser.parse_args(argv)
    # Twisted's default reactor on Linux is epoll, as twistd uses.
    from twisted.internet import reactor

    tls = CertFiles(cert=args.cert, key=args.key) if args.cert and args.key else None
    factory = build_factory({args.user: args.password}, tls=tls, pipelining=args.pipelining)
    reactor.listenTCP(args.port, factory, backlog=1024, interface="127.0.0.1")
    sys.stdout.write(f"listening {args.port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
