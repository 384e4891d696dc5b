"""
Tests for L{smtpgw.tls}: the self-signed certificate, loading certificate
files into TLS options, and reloading them.

File handling is tested directly; the protocol floor, the chain and reloads
over real TLS connections on 127.0.0.1 (clients are the standard library's
C{ssl} in a thread, so they share nothing with the server's OpenSSL setup).
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import ssl
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IReactorFromThreads,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.protocols.wire import Echo
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

import smtpgw.tls
from smtpgw.tls import (
    EXPIRY_WARNING,
    SELF_SIGNED_RENEWAL,
    SELF_SIGNED_VALIDITY,
    ReloadableTLS,
    TLSConfigError,
    ensure_self_signed,
    install_sighup_reload,
    load_tls_options,
    reloadable_tls,
    utc_now,
)
from tests.twisted_support import async_test, global_reactor

P = ParamSpec("P")
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=utc_now().tzinfo)


def capturing_logger(events: list[dict[str, Any]]) -> Logger:
    """
    @return: a logger whose events go into C{events} only.
    """
    return Logger(observer=cast(ILogObserver, events.append))


def levels(events: list[dict[str, Any]]) -> list[LogLevel]:
    """
    @return: the level of each event.
    """
    return [event["log_level"] for event in events]


# Certificates for the tests: EC keys, which are quick to make.


def make_certificate(
    common_name: str,
    key: Any,
    *,
    issuer: tuple[x509.Certificate, Any] | None = None,
    ca: bool = False,
    names: tuple[str, ...] = (),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    """
    @param issuer: the issuing certificate and its key; self-signed if
        L{None}.
    @return: a certificate for C{key}.
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    now = utc_now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(days=1))
        .not_valid_after(not_after or now + timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def new_key() -> ec.EllipticCurvePrivateKey:
    """
    @return: a fresh P-256 key.
    """
    return ec.generate_private_key(ec.SECP256R1())


def pem(*items: Any) -> bytes:
    """
    @return: certificates and keys as concatenated PEM.
    """
    out = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            out += item.public_bytes(serialization.Encoding.PEM)
        else:
            out += item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    return out


def write_pair(directory: Path, certificate_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    """
    @return: the paths of C{server.crt} and C{server.key} written in
        C{directory}.
    """
    cert, key = directory / "server.crt", directory / "server.key"
    cert.write_bytes(certificate_pem)
    key.write_bytes(key_pem)
    return cert, key


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """
    A valid self-signed certificate and key in files.
    """
    key = new_key()
    return write_pair(tmp_path, pem(make_certificate("mail.test", key)), pem(key))


def load_certificate(path: FilePath[str] | Path) -> x509.Certificate:
    """
    @return: the first certificate of a PEM file.
    """
    data = Path(path.path if isinstance(path, FilePath) else path).read_bytes()
    return x509.load_pem_x509_certificates(data)[0]


def served(options: CertificateOptions) -> x509.Certificate:
    """
    @return: the server certificate of C{options}.
    """
    assert options.certificate is not None
    return options.certificate.to_cryptography()


# ensure_self_signed


def test_self_signed_is_generated_with_names_and_validity(tmp_path: Path) -> None:
    """
    The generated certificate is a non-CA RSA 2048 server certificate for the
    host name, localhost and both loopback addresses, valid two years.
    """
    events: list[dict[str, Any]] = []
    cert, key = ensure_self_signed(
        str(tmp_path), "mail.example.com", log=capturing_logger(events), now=NOW
    )
    assert (cert.path, key.path) == (
        str(tmp_path / "tls" / "selfsigned.crt"),
        str(tmp_path / "tls" / "selfsigned.key"),
    )
    certificate = load_certificate(cert)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.com", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "mail.example.com"
    )
    assert certificate.not_valid_after_utc == NOW + SELF_SIGNED_VALIDITY
    assert certificate.not_valid_before_utc <= NOW
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public_key = certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    assert public_key.key_size == 2048
    assert levels(events) == [LogLevel.info]


def test_self_signed_files_are_private(tmp_path: Path) -> None:
    """
    The key is readable by its owner only, the directory is private, and no
    temporary file is left behind.
    """
    cert, key = ensure_self_signed(tmp_path, "mail.test")
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cert.path).st_mode) & 0o077 in (0o044, 0o004, 0o040, 0)
    assert stat.S_IMODE(os.stat(tmp_path / "tls").st_mode) == 0o700
    assert sorted(os.listdir(tmp_path / "tls")) == ["selfsigned.crt", "selfsigned.key"]


def test_self_signed_key_is_private_despite_permissive_umask(tmp_path: Path) -> None:
    """
    Even with umask 0, the key file is created 0600.
    """
    previous = os.umask(0)
    try:
        _, key = ensure_self_signed(tmp_path, "mail.test")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_self_signed_given_to_the_dropped_user(tmp_path: Path) -> None:
    """
    With an owner (the --uid/--gid the gateway drops to), the directory and
    both files belong to that user, also when the pair is reused, so a
    reload after the drop can read the key.
    """
    nobody = pwd.getpwnam("nobody")
    owner = (nobody.pw_uid, nobody.pw_gid)
    ensure_self_signed(tmp_path, "mail.test")
    cert, key = ensure_self_signed(tmp_path, "mail.test", owner=owner)
    for path in (tmp_path / "tls", Path(cert.path), Path(key.path)):
        assert (path.stat().st_uid, path.stat().st_gid) == owner
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600


def test_self_signed_is_reused_on_later_starts(tmp_path: Path) -> None:
    """
    A second call finds the pair and leaves it as it is.
    """
    cert, key = ensure_self_signed(tmp_path, "mail.test", now=NOW)
    before = (Path(cert.path).read_bytes(), Path(key.path).read_bytes())
    events: list[dict[str, Any]] = []
    again = ensure_self_signed(tmp_path, "mail.test", log=capturing_logger(events), now=NOW)
    assert again == (cert, key)
    assert (Path(cert.path).read_bytes(), Path(key.path).read_bytes()) == before
    assert events == []


def test_self_signed_renewed_at_the_renewal_margin(tmp_path: Path) -> None:
    """
    A generated certificate is reused one second before it is within the
    renewal margin of its expiry, and replaced once it is.
    """
    cert, _ = ensure_self_signed(tmp_path, "mail.test", now=NOW)
    original = Path(cert.path).read_bytes()
    expiry = load_certificate(cert).not_valid_after_utc
    just_outside = expiry - SELF_SIGNED_RENEWAL - timedelta(seconds=1)
    ensure_self_signed(tmp_path, "mail.test", now=just_outside)
    assert Path(cert.path).read_bytes() == original
    events: list[dict[str, Any]] = []
    ensure_self_signed(
        tmp_path, "mail.test", log=capturing_logger(events), now=expiry - SELF_SIGNED_RENEWAL
    )
    assert Path(cert.path).read_bytes() != original
    assert "replacing self-signed certificate" in events[0]["log_format"]


@pytest.mark.parametrize("damage", ["remove key", "remove cert", "other key", "garbage"])
def test_self_signed_replaced_when_unusable(tmp_path: Path, damage: str) -> None:
    """
    A missing half, a key that does not match, or a damaged file is replaced
    by a new pair that matches.
    """
    cert, key = ensure_self_signed(tmp_path, "mail.test")
    original = Path(cert.path).read_bytes()
    if damage == "remove key":
        key.remove()
    elif damage == "remove cert":
        cert.remove()
    elif damage == "other key":
        key.setContent(pem(new_key()))
    else:
        cert.setContent(b"garbage")
    ensure_self_signed(tmp_path, "mail.test")
    assert Path(cert.path).read_bytes() != original
    load_tls_options(cert, key)


def test_self_signed_for_an_ip_address_and_long_name(tmp_path: Path) -> None:
    """
    An IP address goes in the SAN as an address; a name too long for a
    Common Name still goes in the SAN.
    """
    cert, _ = ensure_self_signed(tmp_path / "a", "192.0.2.7")
    san = load_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(a) for a in san.value.get_values_for_type(x509.IPAddress)] == [
        "192.0.2.7",
        "127.0.0.1",
        "::1",
    ]
    long_name = ".".join(["a" * 40, "b" * 40, "example"])
    cert, _ = ensure_self_signed(tmp_path / "b", long_name)
    certificate = load_certificate(cert)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "smtpgw"
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert long_name in san.value.get_values_for_type(x509.DNSName)


def test_self_signed_for_localhost_names_it_once(tmp_path: Path) -> None:
    """
    The host name C{localhost} is not listed twice.
    """
    cert, _ = ensure_self_signed(tmp_path, "localhost")
    san = load_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]


def test_self_signed_international_name(tmp_path: Path) -> None:
    """
    A non-ASCII host name is written in its IDNA form.
    """
    cert, _ = ensure_self_signed(tmp_path, "bücher.example")
    san = load_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "xn--bcher-kva.example" in san.value.get_values_for_type(x509.DNSName)


def test_self_signed_refuses_impossible_host_name(tmp_path: Path) -> None:
    """
    A host name that cannot be a DNS name is a TLSConfigError, and nothing
    is written.
    """
    with pytest.raises(TLSConfigError, match="not a valid host name"):
        ensure_self_signed(tmp_path, "mail..example")
    assert not (tmp_path / "tls" / "selfsigned.key").exists()


# load_tls_options


def test_load_gives_tls12_minimum_options(pair: tuple[Path, Path]) -> None:
    """
    The options disable every protocol older than TLS 1.2.
    """
    options = load_tls_options(*pair)
    assert isinstance(options, CertificateOptions)
    enabled = options.getContext().set_options(0)
    assert enabled & SSL.OP_NO_TLSv1
    assert enabled & SSL.OP_NO_TLSv1_1
    assert not enabled & SSL.OP_NO_TLSv1_2
    assert not enabled & SSL.OP_NO_TLSv1_3


def test_load_accepts_file_paths_and_strings(pair: tuple[Path, Path]) -> None:
    """
    Paths may be strings or FilePaths.
    """
    load_tls_options(str(pair[0]), FilePath(str(pair[1])))


def test_load_logs_what_it_loaded(pair: tuple[Path, Path]) -> None:
    """
    An info line names the certificate's names, expiry and fingerprint.
    """
    events: list[dict[str, Any]] = []
    load_tls_options(*pair, log=capturing_logger(events))
    [event] = events
    assert event["log_level"] == LogLevel.info
    assert event["names"] == "mail.test"
    assert event["fingerprint"] == load_certificate(pair[0]).fingerprint(hashes.SHA256()).hex()


class Chain:
    """
    A root CA, an intermediate and a server certificate for C{mail.test}.
    """

    def __init__(self) -> None:
        self.root_key, self.intermediate_key, self.leaf_key = new_key(), new_key(), new_key()
        self.root = make_certificate("Test Root", self.root_key, ca=True)
        self.intermediate = make_certificate(
            "Test Intermediate",
            self.intermediate_key,
            issuer=(self.root, self.root_key),
            ca=True,
        )
        self.leaf = make_certificate(
            "mail.test",
            self.leaf_key,
            issuer=(self.intermediate, self.intermediate_key),
            names=("mail.test",),
        )


@pytest.mark.parametrize("leaf_first", [True, False])
def test_load_full_chain(tmp_path: Path, leaf_first: bool) -> None:
    """
    In a full-chain file the certificate of the key is the server's and the
    others are sent as the chain, whatever their order in the file.
    """
    chain = Chain()
    certs = (chain.leaf, chain.intermediate) if leaf_first else (chain.intermediate, chain.leaf)
    options = load_tls_options(*write_pair(tmp_path, pem(*certs), pem(chain.leaf_key)))
    assert served(options) == chain.leaf
    assert [c.to_cryptography() for c in options.extraCertChain] == [chain.intermediate]


def test_load_key_and_certificate_in_one_file(tmp_path: Path) -> None:
    """
    One PEM file holding the key and the certificate can be given as both.
    """
    key = new_key()
    combined = tmp_path / "combined.pem"
    combined.write_bytes(pem(key, make_certificate("mail.test", key)))
    options = load_tls_options(combined, combined)
    assert options.extraCertChain == []


def test_load_missing_files(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """
    A missing certificate or key file is named in the error.
    """
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError, match=f"certificate file {missing} does not exist"):
        load_tls_options(missing, pair[1])
    with pytest.raises(TLSConfigError, match=f"key file {missing} does not exist"):
        load_tls_options(pair[0], missing)


def test_load_unreadable_file(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """
    A path that cannot be read (here a directory) is named with the reason.
    """
    with pytest.raises(TLSConfigError, match=f"cannot read TLS key file {tmp_path}: Is a dir"):
        load_tls_options(pair[0], tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_load_file_without_permission(pair: tuple[Path, Path]) -> None:
    """
    A key file the gateway may not read is reported as such.
    """
    pair[1].chmod(0)
    with pytest.raises(TLSConfigError, match=r"cannot read TLS key file .*: Permission denied"):
        load_tls_options(*pair)


def test_load_garbage(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """
    Files without PEM blocks of the right kind are refused with the file
    named.
    """
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    with pytest.raises(TLSConfigError, match=f"no PEM certificate found in {garbage}"):
        load_tls_options(garbage, pair[1])
    with pytest.raises(TLSConfigError, match=f"no PEM private key found in {garbage}"):
        load_tls_options(pair[0], garbage)
    with pytest.raises(TLSConfigError, match=f"no PEM private key found in {pair[0]}"):
        load_tls_options(pair[0], pair[0])
    with pytest.raises(TLSConfigError, match=f"no PEM certificate found in {pair[1]}"):
        load_tls_options(pair[1], pair[1])


def test_load_encrypted_key(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """
    A passphrase-protected key is refused with a hint.
    """
    key = serialization.load_pem_private_key(pair[1].read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="is encrypted; give an unencrypted key"):
        load_tls_options(pair[0], encrypted)


def test_load_key_that_cannot_sign(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """
    A key-agreement-only key is refused, not passed on to OpenSSL.
    """
    odd = tmp_path / "x25519.key"
    odd.write_bytes(pem(x25519.X25519PrivateKey.generate()))
    with pytest.raises(TLSConfigError, match="X25519PrivateKey, which cannot sign"):
        load_tls_options(pair[0], odd)


def test_load_key_not_matching_certificate(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """
    A key that belongs to no certificate of the file is refused.
    """
    other = tmp_path / "other.key"
    other.write_bytes(pem(new_key()))
    with pytest.raises(TLSConfigError, match="does not match any certificate in"):
        load_tls_options(pair[0], other)


def test_load_key_too_weak_for_openssl(tmp_path: Path) -> None:
    """
    What OpenSSL itself refuses (a 1024-bit RSA key at its default security
    level) is a TLSConfigError at load time, not a failure at STARTTLS.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    cert, key_path = write_pair(tmp_path, pem(make_certificate("weak", key)), pem(key))
    with pytest.raises(TLSConfigError, match="OpenSSL refused"):
        load_tls_options(cert, key_path)


@pytest.mark.parametrize(
    ("valid", "warning"),
    [
        ((NOW - timedelta(days=400), NOW - timedelta(seconds=1)), "expired at"),
        ((NOW + timedelta(days=1), NOW + timedelta(days=400)), "is not valid before"),
        ((NOW - timedelta(days=1), NOW + EXPIRY_WARNING), "renew it"),
    ],
)
def test_load_warns_about_dates_but_loads(
    tmp_path: Path, valid: tuple[datetime, datetime], warning: str
) -> None:
    """
    An expired, not yet valid, or soon expiring certificate is loaded with a
    warning: refusing it would also take plain SMTP down.
    """
    key = new_key()
    certificate = make_certificate("mail.test", key, not_before=valid[0], not_after=valid[1])
    events: list[dict[str, Any]] = []
    options = load_tls_options(
        *write_pair(tmp_path, pem(certificate), pem(key)), log=capturing_logger(events), now=NOW
    )
    assert served(options) == certificate
    assert levels(events) == [LogLevel.warn, LogLevel.info]
    assert warning in events[0]["log_format"]


def test_load_no_warning_just_outside_expiry_margin(tmp_path: Path) -> None:
    """
    A certificate with one second more than the warning margin left loads
    silently.
    """
    key = new_key()
    certificate = make_certificate(
        "mail.test",
        key,
        not_before=NOW - timedelta(days=1),
        not_after=NOW + EXPIRY_WARNING + timedelta(seconds=1),
    )
    events: list[dict[str, Any]] = []
    load_tls_options(
        *write_pair(tmp_path, pem(certificate), pem(key)), log=capturing_logger(events), now=NOW
    )
    assert levels(events) == [LogLevel.info]


# ReloadableTLS


def test_reloadable_provides_the_connection_creator_interfaces(
    pair: tuple[Path, Path],
) -> None:
    """
    It can be given wherever Twisted takes server TLS options.
    """
    reloadable = ReloadableTLS(*pair)
    assert verifyObject(IOpenSSLServerConnectionCreator, reloadable)
    assert verifyObject(IOpenSSLContextFactory, reloadable)
    assert reloadable.getContext() is reloadable.options().getContext()


def test_reloadable_refuses_to_start_with_bad_files(tmp_path: Path) -> None:
    """
    Bad files at start are an error: the gateway does not start half-set-up.
    """
    with pytest.raises(TLSConfigError):
        ReloadableTLS(tmp_path / "missing.crt", tmp_path / "missing.key")


@async_test
async def test_reload_picks_up_new_files(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """
    After the files are replaced, reload switches to the new options.
    """
    reloadable = ReloadableTLS(*pair)
    before = reloadable.options()
    key = new_key()
    new_certificate = make_certificate("new.test", key)
    write_pair(tmp_path, pem(new_certificate), pem(key))
    assert await reloadable.reload_in_thread(global_reactor()) is True
    assert reloadable.options() is not before
    assert served(reloadable.options()) == new_certificate


def _refusing(path: FilePath[str], what: str) -> bytes:
    raise TLSConfigError(f"cannot read TLS {what} file {path.path}: no answer")


@pytest.mark.parametrize("damage", ["unreadable", "garbage cert", "missing key", "other key"])
@async_test
async def test_failed_reload_keeps_serving_the_old_certificate(
    pair: tuple[Path, Path], damage: str
) -> None:
    """
    A reload that fails (the reader refuses, the files are bad) logs the
    error, keeps the previous options, and fires with L{False}: it never
    fails.
    """
    events: list[dict[str, Any]] = []
    reloadable = ReloadableTLS(*pair, log=capturing_logger(events))
    if damage == "unreadable":
        reloadable.reader = _refusing
    before = reloadable.options()
    if damage == "garbage cert":
        pair[0].write_bytes(b"garbage")
    elif damage == "missing key":
        pair[1].unlink()
    elif damage == "other key":
        pair[1].write_bytes(pem(new_key()))
    del events[:]
    assert await reloadable.reload_in_thread(global_reactor()) is False
    assert reloadable.options() is before
    [event] = events
    assert event["log_level"] == LogLevel.error
    assert "still using the previous certificate" in event["log_format"]
    if damage == "unreadable":
        assert "no answer" in event["reason"]


@async_test
async def test_reload_survives_unexpected_errors(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Even an unexpected exception while loading is logged, not raised.
    """
    events: list[dict[str, Any]] = []
    reloadable = ReloadableTLS(*pair, log=capturing_logger(events))
    before = reloadable.options()

    def broken(*args: object, **kwargs: object) -> CertificateOptions:
        raise RuntimeError("surprise")

    monkeypatch.setattr(smtpgw.tls, "tls_options_from_pem", broken)
    assert await reloadable.reload_in_thread(global_reactor()) is False
    assert reloadable.options() is before
    assert events[-1]["log_failure"].check(RuntimeError)


class HeldReader:
    """
    A reader of the TLS files that waits, in its thread, until the test
    lets it go (a privileged reader whose helper is slow), and notes how
    many reads ran at once.
    """

    def __init__(self) -> None:
        self.go = threading.Event()
        self.started = threading.Event()
        self.running = 0
        self.most = 0
        self.calls = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, path: FilePath[str], what: str) -> bytes:
        with self._lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        self.started.set()
        try:
            assert self.go.wait(10), "never let go"
            return path.getContent()
        finally:
            with self._lock:
                self.running -= 1


@async_test
async def test_a_reload_in_a_thread_does_not_hold_up_the_reactor(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """
    While the files are read (slowly) for a reload in a thread, the
    reactor goes on, and the options in use stay; then the new ones are
    put in use, from the reactor thread.
    """
    reactor = global_reactor()
    held = HeldReader()
    reloadable = ReloadableTLS(*pair, reader=held)
    before = reloadable.options()
    key = new_key()
    new_certificate = make_certificate("new.test", key)
    write_pair(tmp_path, pem(new_certificate), pem(key))
    reloading = reloadable.reload_in_thread(reactor)
    assert await deferToThread(held.started.wait, 10)
    # The reactor turns while the reader waits.
    await deferLater(reactor, 0.01, lambda: None)
    assert held.running == 1
    assert reloadable.options() is before
    held.go.set()
    assert await reloading is True
    assert served(reloadable.options()) == new_certificate
    assert threading.current_thread().name not in held.threads


@async_test
async def test_reloads_in_threads_run_one_after_another(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """
    Reloads asked for while one runs wait for it: the reader (one helper
    process, one request at a time) never reads for two at once. Those
    asked for meanwhile share one reload, made after the last of them was
    asked (a burst of SIGHUPs costs two reloads).
    """
    reactor = global_reactor()
    held = HeldReader()
    reloadable = ReloadableTLS(*pair, reader=held)
    reloads = [reloadable.reload_in_thread(reactor) for _ in range(3)]
    assert await deferToThread(held.started.wait, 10)
    await deferLater(reactor, 0.01, lambda: None)
    held.go.set()
    assert [await reload for reload in reloads] == [True, True, True]
    assert held.most == 1
    # The certificate and the key, twice.
    assert held.calls == 4
    # Over, it no longer waits for anything: the next one reads anew.
    assert await reloadable.reload_in_thread(reactor) is True
    assert held.calls == 6


def test_reloadable_tls_uses_given_files(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """
    With --tls-cert and --tls-key, those files are used and nothing is
    generated.
    """
    reloadable = reloadable_tls(tmp_path / "data", "mail.test", *pair)
    assert reloadable.cert_path.path == str(pair[0])
    assert not (tmp_path / "data").exists()


def test_reloadable_tls_generates_self_signed(tmp_path: Path) -> None:
    """
    Without them, the self-signed pair of the data directory is used.
    """
    reloadable = reloadable_tls(tmp_path, "mail.test")
    assert reloadable.cert_path.path == str(tmp_path / "tls" / "selfsigned.crt")


@pytest.mark.parametrize("given", ["cert", "key"])
def test_reloadable_tls_needs_both_files(
    pair: tuple[Path, Path], tmp_path: Path, given: str
) -> None:
    """
    One of --tls-cert and --tls-key without the other is an error.
    """
    cert, key = (pair[0], None) if given == "cert" else (None, pair[1])
    with pytest.raises(TLSConfigError, match="must be given together"):
        reloadable_tls(tmp_path, "mail.test", cert, key)


@implementer(IReactorFromThreads)
class RecordingReactor:
    """
    Records what is passed to callFromThread.
    """

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []

    def callFromThread(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> None:
        assert not args
        assert not kwargs
        self.calls.append(callable)


class CountingReloadable:
    """
    Counts reloads.
    """

    def __init__(self) -> None:
        self.reloads = 0

    def reload(self) -> bool:
        self.reloads += 1
        return True


@pytest.fixture
def restore_sighup() -> Iterator[None]:
    """
    Put the SIGHUP handler back after the test, whatever it did.
    """
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


@pytest.mark.usefixtures("restore_sighup")
def test_sighup_schedules_a_reload_in_the_reactor_thread() -> None:
    """
    SIGHUP does not reload inside the signal handler: it hands the reload to
    the reactor thread. Uninstalling restores the previous handler.
    """
    previous = signal.getsignal(signal.SIGHUP)
    reactor = RecordingReactor()
    reloadable = CountingReloadable()
    uninstall = install_sighup_reload(reactor, reloadable)
    signal.raise_signal(signal.SIGHUP)
    assert reloadable.reloads == 0
    [scheduled] = reactor.calls
    scheduled()
    assert reloadable.reloads == 1
    uninstall()
    assert signal.getsignal(signal.SIGHUP) == previous


# Real TLS connections on 127.0.0.1.


def client_context(**versions: ssl.TLSVersion) -> ssl.SSLContext:
    """
    @return: a client context that does not verify (the tests compare the
        certificate themselves), with optional protocol bounds.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, version in versions.items():
        setattr(context, name, version)
    return context


def connect(port: int, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    """
    Open a TLS connection to 127.0.0.1:C{port}; blocking, for a thread.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return (context or client_context()).wrap_socket(raw, server_hostname="mail.test")


def peer_certificate(connection: ssl.SSLSocket) -> x509.Certificate:
    """
    @return: the certificate the server presented.
    """
    der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def echo(connection: ssl.SSLSocket, data: bytes) -> bytes:
    """
    Send C{data} and read back as many bytes; blocking, for a thread.
    """
    connection.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = connection.recv(len(data) - len(received))
        if not chunk:
            break
        received += chunk
    return received


def listen_tls(creator: Any) -> IListeningPort:
    """
    @return: an echo server with C{creator}'s TLS on a free port of
        127.0.0.1.
    """
    from twisted.internet import reactor

    port: IListeningPort = reactor.listenSSL(  # type: ignore[attr-defined]
        0, Factory.forProtocol(Echo), creator, interface="127.0.0.1"
    )
    return port


async def stop(port: IListeningPort) -> None:
    """
    Stop listening and wait until the port is closed.
    """
    await maybeDeferred(port.stopListening)


def port_number(port: IListeningPort) -> int:
    """
    @return: the number a listening port got.
    """
    number: int = port.getHost().port  # type: ignore[attr-defined]
    return number


@async_test
async def test_reload_changes_new_connections_and_keeps_old_ones(tmp_path: Path) -> None:
    """
    Before a reload clients see certificate A; after it a new connection
    sees certificate B while a connection made before keeps working, still
    with A.
    """
    key_a, key_b = new_key(), new_key()
    cert_a, cert_b = make_certificate("a.test", key_a), make_certificate("b.test", key_b)
    cert_path, key_path = write_pair(tmp_path, pem(cert_a), pem(key_a))
    reloadable = ReloadableTLS(cert_path, key_path)
    port = listen_tls(reloadable)
    old: ssl.SSLSocket | None = None
    new: ssl.SSLSocket | None = None
    try:
        old = await deferToThread(connect, port_number(port))
        assert peer_certificate(old) == cert_a
        assert await deferToThread(echo, old, b"before reload") == b"before reload"

        write_pair(tmp_path, pem(cert_b), pem(key_b))
        assert await reloadable.reload_in_thread(global_reactor()) is True

        new = await deferToThread(connect, port_number(port))
        assert peer_certificate(new) == cert_b
        assert await deferToThread(echo, new, b"new connection") == b"new connection"
        assert await deferToThread(echo, old, b"after reload") == b"after reload"
        assert peer_certificate(old) == cert_a
    finally:
        for connection in (old, new):
            if connection is not None:
                connection.close()
        await stop(port)


@async_test
async def test_full_chain_is_sent_to_clients(tmp_path: Path) -> None:
    """
    A client that trusts only the root CA verifies the server, so the
    intermediate from the full-chain file reached it.
    """
    chain = Chain()
    cert_path, key_path = write_pair(
        tmp_path, pem(chain.leaf, chain.intermediate), pem(chain.leaf_key)
    )
    port = listen_tls(ReloadableTLS(cert_path, key_path))
    root = tmp_path / "root.pem"
    root.write_bytes(pem(chain.root))
    verifying = ssl.create_default_context(cafile=str(root))
    try:
        connection = await deferToThread(connect, port_number(port), verifying)
        try:
            assert peer_certificate(connection) == chain.leaf
        finally:
            connection.close()
    finally:
        await stop(port)


def tls11_client() -> ssl.SSLContext:
    """
    @return: a client that offers TLS 1.1 only (security level 0, as the
        local OpenSSL would otherwise refuse to offer it at all).
    """
    with warnings.catch_warnings():
        # Deprecated is the point: this is the client that must be refused.
        warnings.simplefilter("ignore", DeprecationWarning)
        context = client_context(
            minimum_version=ssl.TLSVersion.TLSv1_1, maximum_version=ssl.TLSVersion.TLSv1_1
        )
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


@async_test
async def test_tls11_client_is_refused(pair: tuple[Path, Path]) -> None:
    """
    A client limited to TLS 1.1 cannot connect. A control server that allows
    TLS 1.1 first shows that this machine can speak TLS 1.1 at all; where it
    cannot, the test falls back to checking the option is set.
    """
    options = load_tls_options(*pair)
    control_options = CertificateOptions(
        privateKey=options.privateKey,
        certificate=options.certificate,
        insecurelyLowerMinimumTo=TLSVersion.TLSv1_1,
    )
    control_options.getContext().set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    control = listen_tls(control_options)
    try:
        connection = await deferToThread(connect, port_number(control), tls11_client())
        control_speaks_tls11 = connection.version() == "TLSv1.1"
        connection.close()
    except ssl.SSLError:
        control_speaks_tls11 = False
    finally:
        await stop(control)
    if not control_speaks_tls11:
        assert options.getContext().set_options(0) & SSL.OP_NO_TLSv1_1
        pytest.skip("this OpenSSL cannot speak TLS 1.1 at all; checked the option instead")

    port = listen_tls(ReloadableTLS(*pair))
    try:
        with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|unsupported protocol"):
            await deferToThread(connect, port_number(port), tls11_client())
        tls12 = await deferToThread(
            connect,
            port_number(port),
            client_context(maximum_version=ssl.TLSVersion.TLSv1_2),
        )
        assert tls12.version() == "TLSv1.2"
        tls12.close()
    finally:
        await stop(port)
