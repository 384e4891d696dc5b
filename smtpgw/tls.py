"""
TLS for STARTTLS: the server certificate, its options and reloading it.

With neither C{--tls-cert} nor C{--tls-key}, a self-signed certificate is
generated once into C{<data-dir>/tls/} so STARTTLS works out of the box.
Files are parsed with C{cryptography} and handed to Twisted as pyOpenSSL
objects made from those; TLS 1.2 is the minimum.

L{ReloadableTLS} is what the protocol factories get as their TLS connection
creator: every new connection (or STARTTLS) asks it for the current options,
so a reload changes the certificate for new connections while established
ones keep theirs.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from attrs import define, field
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IReactorFromThreads,
    IReactorThreads,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

__all__ = [
    "EXPIRY_WARNING",
    "MINIMUM_TLS_VERSION",
    "SELF_SIGNED_RENEWAL",
    "SELF_SIGNED_VALIDITY",
    "Reloadable",
    "ReloadableTLS",
    "TLSConfigError",
    "ensure_self_signed",
    "install_sighup_reload",
    "load_tls_options",
    "reloadable_tls",
    "tls_options_from_pem",
    "utc_now",
]

MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2
"""The oldest protocol version a client may use (PRODUCT section 2)."""

SELF_SIGNED_VALIDITY = timedelta(days=730)
"""How long a generated self-signed certificate is valid."""

SELF_SIGNED_RENEWAL = timedelta(days=30)
"""A generated certificate this close to expiry is replaced at start."""

EXPIRY_WARNING = timedelta(days=14)
"""A certificate this close to expiry is loaded with a warning."""

_RSA_KEY_BITS = 2048
# A Common Name longer than this is invalid X.509; the SAN carries the name.
_MAX_COMMON_NAME = 64

_log = Logger()

Pathish = FilePath[str] | str | os.PathLike[str]


class TLSConfigError(Exception):
    """
    The TLS certificate or key cannot be used; the message says which file
    and why.
    """


def utc_now() -> datetime:
    """
    @return: the current time, timezone-aware in UTC.
    """
    return datetime.now(UTC)


def _as_path(path: Pathish) -> FilePath[str]:
    """
    @return: C{path} as a L{FilePath}.
    """
    return path if isinstance(path, FilePath) else FilePath(os.fspath(path))


def _read(path: FilePath[str], what: str) -> bytes:
    """
    @param what: what the file should hold, for the message.
    @return: the file's bytes.
    @raise TLSConfigError: when the file is missing or unreadable.
    """
    try:
        return path.getContent()
    except FileNotFoundError:
        raise TLSConfigError(f"TLS {what} file {path.path} does not exist") from None
    except OSError as error:
        raise TLSConfigError(
            f"cannot read TLS {what} file {path.path}: {error.strerror or error}"
        ) from None


def _parse_certificates(data: bytes, path: FilePath[str]) -> list[x509.Certificate]:
    """
    @param data: the PEM file's bytes.
    @param path: where they were read (for messages).
    @return: every certificate of a PEM file, in file order.
    @raise TLSConfigError: when there is none.
    """
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"no PEM certificate found in {path.path}") from None


# The key types both cryptography can sign with and pyOpenSSL can convert.
SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)
_SIGNING_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)


def _parse_key(data: bytes, path: FilePath[str]) -> SigningKey:
    """
    @param data: the PEM file's bytes.
    @param path: where they were read (for messages).
    @return: the private key of a PEM file (which may also hold certificates).
    @raise TLSConfigError: when there is no unencrypted key that can sign.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"the private key in {path.path} is encrypted; give an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(f"no PEM private key found in {path.path}") from None
    if not isinstance(key, _SIGNING_KEYS):
        raise TLSConfigError(
            f"the private key in {path.path} is a {type(key).__name__}, which cannot sign"
        )
    return key


def _public_der(key: Any) -> bytes:
    """
    @return: a public key in a form that compares equal for equal keys.
    """
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _split_chain(
    certificates: list[x509.Certificate],
    key: SigningKey,
    cert_path: FilePath[str],
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """
    Find the certificate of C{key} among C{certificates}; the others are the
    chain sent along with it, in file order.

    @raise TLSConfigError: when no certificate matches the key.
    """
    wanted = _public_der(key.public_key())
    for index, certificate in enumerate(certificates):
        if _public_der(certificate.public_key()) == wanted:
            return certificate, certificates[:index] + certificates[index + 1 :]
    raise TLSConfigError(f"the private key does not match any certificate in {cert_path.path}")


def _names(certificate: x509.Certificate) -> list[str]:
    """
    @return: the DNS names and addresses a certificate is for.
    """
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return [str(name) for name in san.value.get_values_for_type(x509.DNSName)] + [
        str(address) for address in san.value.get_values_for_type(x509.IPAddress)
    ]


def _check_dates(
    certificate: x509.Certificate, cert_path: FilePath[str], now: datetime, log: Logger
) -> None:
    """
    Warn about a certificate that is expired, not yet valid or expiring soon;
    it is still used, as refusing to start would also stop plain SMTP.
    """
    fields = {
        "path": cert_path.path,
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": certificate.not_valid_after_utc.isoformat(),
    }
    if certificate.not_valid_after_utc < now:
        log.warn(
            "TLS certificate {path} expired at {not_after}; clients that verify will refuse it",
            **fields,
        )
    elif certificate.not_valid_before_utc > now:
        log.warn(
            "TLS certificate {path} is not valid before {not_before}; clients that verify"
            " will refuse it until then",
            **fields,
        )
    elif certificate.not_valid_after_utc - now <= EXPIRY_WARNING:
        log.warn("TLS certificate {path} expires at {not_after}; renew it", **fields)


def load_tls_options(
    cert_path: Pathish,
    key_path: Pathish,
    *,
    log: Logger = _log,
    now: datetime | None = None,
) -> CertificateOptions:
    """
    Read a certificate (with its chain) and key into server TLS options.

    @param cert_path: PEM certificates: the server's and its intermediates
        (a full-chain file), in any order.
    @param key_path: the PEM private key, unencrypted; may be the same file.
    @param log: where warnings about validity dates and the loaded
        certificate's summary go.
    @param now: the time to check validity against; the current time by
        default.
    @return: options with TLS 1.2 as the minimum, sending the chain.
    @raise TLSConfigError: for a missing or unreadable file, no certificate
        or key in it, an encrypted key, a key that matches no certificate, or
        a certificate or key OpenSSL refuses. An expired certificate is only
        warned about.
    """
    cert_file, key_file = _as_path(cert_path), _as_path(key_path)
    return tls_options_from_pem(
        _read(cert_file, "certificate"),
        _read(key_file, "key"),
        cert_path=cert_file,
        key_path=key_file,
        log=log,
        now=now,
    )


def tls_options_from_pem(
    cert_pem: bytes,
    key_pem: bytes,
    *,
    cert_path: Pathish,
    key_path: Pathish,
    log: Logger = _log,
    now: datetime | None = None,
) -> CertificateOptions:
    """
    L{load_tls_options} for files already read (an acceptor process gets
    them from the main process, which could read them).

    @param cert_path: where C{cert_pem} was read, for messages.
    @param key_path: where C{key_pem} was read, for messages.
    @raise TLSConfigError: as L{load_tls_options}.
    """
    cert_file, key_file = _as_path(cert_path), _as_path(key_path)
    certificates = _parse_certificates(cert_pem, cert_file)
    key = _parse_key(key_pem, key_file)
    leaf, chain = _split_chain(certificates, key, cert_file)
    _check_dates(leaf, cert_file, now or utc_now(), log)
    try:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(leaf),
            extraCertChain=[crypto.X509.from_cryptography(extra) for extra in chain],
            raiseMinimumTo=MINIMUM_TLS_VERSION,
        )
        # Building the context now surfaces what OpenSSL refuses (a key too
        # weak for its security level, say) at load time, not at a client's
        # first STARTTLS.
        options.getContext()
    except (SSL.Error, crypto.Error, TypeError, ValueError) as error:
        raise TLSConfigError(
            f"OpenSSL refused the certificate {cert_file.path} or key {key_file.path}: {error}"
        ) from None
    log.info(
        "loaded TLS certificate {path} for {names}, valid until {not_after}"
        " (sha256 {fingerprint}, {chain_length} chain certificates)",
        path=cert_file.path,
        names=", ".join(_names(leaf)),
        not_after=leaf.not_valid_after_utc.isoformat(),
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
        chain_length=len(chain),
    )
    return options


def _san_entry(name: str) -> x509.GeneralName:
    """
    @return: C{name} as an IP address or DNS name entry.
    @raise TLSConfigError: when it is neither.
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        return x509.DNSName(name.encode("idna").decode("ascii"))
    except UnicodeError:
        raise TLSConfigError(f"{name!r} is not a valid host name for a certificate") from None


def _self_signed(hostname: str, now: datetime) -> tuple[x509.Certificate, SigningKey]:
    """
    @return: a new self-signed server certificate for C{hostname},
        C{localhost} and the loopback addresses, and its key.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_KEY_BITS)
    common_name = hostname if 0 < len(hostname) <= _MAX_COMMON_NAME else "smtpgw"
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "smtpgw self-signed"),
        ]
    )
    names: list[x509.GeneralName] = []
    for name in (hostname, "localhost", "127.0.0.1", "::1"):
        entry = _san_entry(name)
        if entry not in names:
            names.append(entry)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # An hour of slack for clients whose clocks are a little behind.
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _write_atomically(path: FilePath[str], data: bytes, mode: int) -> None:
    """
    Replace C{path} with C{data} so that readers see the old or the new
    content, never a part, and the file never has looser permissions than
    C{mode}, not even for a moment.
    """
    temporary = path.temporarySibling(".tmp")
    descriptor = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as stream:
            descriptor = -1
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary.path, path.path)
    except BaseException:
        if descriptor != -1:
            os.close(descriptor)
        if temporary.exists():
            temporary.remove()
        raise
    directory = os.open(path.parent().path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _reusable(cert: FilePath[str], key: FilePath[str], now: datetime, log: Logger) -> bool:
    """
    @return: whether a generated pair exists, loads, and is not near expiry.
    """
    if not (cert.exists() and key.exists()):
        return False
    try:
        certificates = _parse_certificates(_read(cert, "certificate"), cert)
        leaf, _ = _split_chain(certificates, _parse_key(_read(key, "key"), key), cert)
    except TLSConfigError as error:
        log.warn("replacing unusable self-signed certificate: {reason}", reason=str(error))
        return False
    if leaf.not_valid_after_utc - now <= SELF_SIGNED_RENEWAL:
        log.info(
            "replacing self-signed certificate {path} that expires at {not_after}",
            path=cert.path,
            not_after=leaf.not_valid_after_utc.isoformat(),
        )
        return False
    return True


def ensure_self_signed(
    data_dir: Pathish,
    hostname: str,
    *,
    owner: tuple[int, int] | None = None,
    log: Logger = _log,
    now: datetime | None = None,
) -> tuple[FilePath[str], FilePath[str]]:
    """
    Make sure C{<data_dir>/tls/selfsigned.crt} and C{.key} hold a usable
    self-signed certificate and key; generate them only when they are
    missing, unusable, or expire within L{SELF_SIGNED_RENEWAL}.

    The certificate is RSA 2048 (the most widely supported key type, for old
    devices that submit mail), names C{hostname}, C{localhost}, C{127.0.0.1}
    and C{::1}, and is valid for L{SELF_SIGNED_VALIDITY}. The key file is
    mode 0600 and the directory 0700; both files are replaced atomically.

    @param data_dir: the gateway's data directory; C{tls/} is created in it.
    @param hostname: the name clients use to reach the gateway.
    @param owner: the uid and gid the gateway runs as after
        C{twistd --uid/--gid}; the directory and files are given to them so
        that a reload after the drop can still read the key. Needs root.
    @param log: where generation is reported.
    @param now: the current time, by default the clock's.
    @return: the certificate and key paths.
    @raise TLSConfigError: when C{hostname} cannot be put in a certificate.
    """
    now = now or utc_now()
    directory = _as_path(data_dir).child("tls")
    _refuse_links(directory)
    cert, key = directory.child("selfsigned.crt"), directory.child("selfsigned.key")
    if not _reusable(cert, key, now, log):
        _generate(directory, cert, key, hostname, now, log)
    if owner is not None:
        # Never through a link: whoever owns the directory could otherwise
        # point these names at any file and have root give it away.
        for path in (directory, key, cert):
            os.chown(path.path, *owner, follow_symlinks=False)
    return cert, key


def _refuse_links(directory: FilePath[str]) -> None:
    """
    Refuse a C{tls} directory that is a symbolic link or not a directory,
    or that holds the certificate or key as links: the gateway changes the
    mode and owner of what is there while it is still root.
    """
    try:
        mode = os.lstat(directory.path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        raise TLSConfigError(f"{directory.path} must be a directory, not a link or a file")
    for name in ("selfsigned.crt", "selfsigned.key"):
        child = directory.child(name)
        if os.path.islink(child.path):
            raise TLSConfigError(f"{child.path} is a symbolic link; refusing to use it")


def _generate(
    directory: FilePath[str],
    cert: FilePath[str],
    key: FilePath[str],
    hostname: str,
    now: datetime,
    log: Logger,
) -> None:
    """
    Write a new self-signed pair into C{directory}.
    """
    certificate, private_key = _self_signed(hostname, now)
    directory.makedirs(ignoreExistingDirectory=True)
    os.chmod(directory.path, 0o700)
    # The key goes first: a crash between the writes leaves a pair that does
    # not match, which the next start replaces.
    _write_atomically(
        key,
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write_atomically(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info(
        "generated a self-signed TLS certificate {path} for {names}, valid until {not_after}",
        path=cert.path,
        names=", ".join(_names(certificate)),
        not_after=certificate.not_valid_after_utc.isoformat(),
    )


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
@define(eq=False)
class ReloadableTLS:
    """
    Server TLS options that can be re-read from their files at run time.

    Give this object where Twisted wants server TLS options (C{listenSSL},
    C{TLSMemoryBIOFactory}, the ESMTP factory's context for STARTTLS): each
    new TLS connection uses the options current at that moment.

    @ivar cert_path: the PEM certificate (chain) file.
    @ivar key_path: the PEM private key file.
    @ivar log: where loads and failed reloads are reported.
    @ivar now: the clock used for validity warnings.
    @ivar reader: reads a file's bytes for a reload (the path, and what it
        should hold, for messages), raising L{TLSConfigError}; after
        privileges were dropped, L{smtpgw.keyreader.PrivilegedReader.read}.
        The first load, at start, reads the files itself.
    """

    cert_path: FilePath[str] = field(converter=_as_path)
    key_path: FilePath[str] = field(converter=_as_path)
    log: Logger = field(default=_log, repr=False)
    now: Callable[[], datetime] = field(default=utc_now, repr=False)
    reader: Callable[[FilePath[str], str], bytes] = field(default=_read, repr=False)
    _current: CertificateOptions = field(init=False, repr=False)
    _pem: tuple[bytes, bytes] = field(init=False, repr=False)
    _reloading: DeferredLock = field(init=False, factory=DeferredLock, repr=False)
    _queued: Deferred[bool] | None = field(init=False, default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        """
        Load the files a first time.

        @raise TLSConfigError: when they cannot be used, so a misconfigured
            gateway does not start.
        """
        self._current = self._load(_read)

    def _load(self, reader: Callable[[FilePath[str], str], bytes]) -> CertificateOptions:
        """
        @return: options read from the files now with C{reader} (their
            bytes are kept in L{pem} once they are in use).
        """
        return self._options(self._read_files(reader))

    def _read_files(self, reader: Callable[[FilePath[str], str], bytes]) -> tuple[bytes, bytes]:
        return reader(self.cert_path, "certificate"), reader(self.key_path, "key")

    def _options(self, files: tuple[bytes, bytes]) -> CertificateOptions:
        cert_pem, key_pem = files
        options = tls_options_from_pem(
            cert_pem,
            key_pem,
            cert_path=self.cert_path,
            key_path=self.key_path,
            log=self.log,
            now=self.now(),
        )
        self._pem = (cert_pem, key_pem)
        return options

    @property
    def pem(self) -> tuple[bytes, bytes]:
        """
        The certificate file's and the key file's bytes in use (for the
        acceptor processes, which may not be allowed to read the files).
        """
        return self._pem

    def options(self) -> CertificateOptions:
        """
        @return: the options new connections get.
        """
        return self._current

    def reload_in_thread(self, reactor: IReactorThreads) -> Deferred[bool]:
        """
        Re-read the certificate and key. On any failure the options in use
        are kept and the reason is logged: a bad file never stops the
        gateway from serving.

        The files are read in a thread of C{reactor}'s pool: a reader that
        waits on a helper process (up to its timeout) never holds up the
        reactor, and with it every session. The options are made and put
        in use in the reactor thread. A reload asked for while
        one runs waits for it (the helper answers one request at a time),
        and all those asked for meanwhile share that one: it reads the
        files after every one of them was asked, so a burst of SIGHUPs
        costs two reloads, not one each.

        @return: fires with whether the new files are now in use; never
            fails.
        """
        if self._queued is None:
            if not self._reloading.locked:
                return self._reloading.run(self._reload_in_thread, reactor)
            self._queued = self._reloading.run(self._reload_in_thread, reactor)
        shared: Deferred[bool] = Deferred()

        def share(reloaded: bool) -> bool:
            shared.callback(reloaded)
            return reloaded

        self._queued.addCallback(share)
        return shared

    def _reload_in_thread(self, reactor: IReactorThreads) -> Deferred[bool]:
        # From here on, a reload asked for reads the files after this one.
        self._queued = None
        read = deferToThreadPool(reactor, reactor.getThreadPool(), self._read_files, self.reader)
        return read.addCallbacks(self._use, self._failed)

    def _use(self, files: tuple[bytes, bytes]) -> bool:
        try:
            self._current = self._options(files)
        except Exception:
            return self._failed(Failure())
        self.log.info("TLS certificate reloaded from {path}", path=self.cert_path.path)
        return True

    def _failed(self, failure: Failure) -> bool:
        if failure.check(TLSConfigError):
            self.log.error(
                "TLS reload failed, still using the previous certificate: {reason}",
                reason=failure.getErrorMessage(),
            )
        else:
            self.log.failure("TLS reload failed, still using the previous certificate", failure)
        return False

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        @return: a server TLS connection with the current options.
        """
        connection: SSL.Connection = self._current.serverConnectionForTLS(tlsProtocol)
        return connection

    def getContext(self) -> SSL.Context:
        """
        @return: the current options' context, for callers of the older
            context factory interface.
        """
        context: SSL.Context = self._current.getContext()
        return context


def reloadable_tls(
    data_dir: Pathish,
    hostname: str,
    cert_path: Pathish | None = None,
    key_path: Pathish | None = None,
    *,
    owner: tuple[int, int] | None = None,
    log: Logger = _log,
    reader: Callable[[FilePath[str], str], bytes] | None = None,
) -> ReloadableTLS:
    """
    The TLS options for C{--tls-cert/--tls-key}, or for the self-signed
    pair in the data directory when neither is given.

    @param owner: see L{ensure_self_signed}; given files are left alone.
    @param reader: see L{ReloadableTLS.reader}; used for given files only
        (the self-signed pair belongs to C{owner}).

    @raise TLSConfigError: when only one of the two files is given, or the
        files cannot be used.
    """
    if (cert_path is None) != (key_path is None):
        raise TLSConfigError("--tls-cert and --tls-key must be given together")
    if cert_path is None or key_path is None:
        cert_path, key_path = ensure_self_signed(data_dir, hostname, owner=owner, log=log)
        return ReloadableTLS(cert_path, key_path, log=log)
    return ReloadableTLS(cert_path, key_path, log=log, reader=reader or _read)


class Reloadable(Protocol):
    """
    Something that re-reads its configuration, such as L{ReloadableTLS}.
    """

    def reload(self) -> bool | Deferred[bool]:
        """
        @return: whether the new configuration is in use (or a L{Deferred}
            that fires with it).
        """


def install_sighup_reload(
    reactor: IReactorFromThreads, reloadable: Reloadable
) -> Callable[[], None]:
    """
    Reload the TLS files when the process gets C{SIGHUP}.

    The reload is started from the reactor thread, not the signal handler. Must be
    called from the main thread.

    @return: undoes the installation, putting the previous handler back.
    """
    if not hasattr(signal, "SIGHUP"):
        return lambda: None

    def on_sighup(signum: int, frame: object) -> None:
        reactor.callFromThread(reloadable.reload)

    previous = signal.signal(signal.SIGHUP, on_sighup)

    def uninstall() -> None:
        signal.signal(signal.SIGHUP, previous)

    return uninstall
