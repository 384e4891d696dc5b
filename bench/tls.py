"""
A throwaway self-signed certificate for the servers the benchmark starts.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@frozen
class CertFiles:
    """
    @ivar cert: the PEM certificate.
    @ivar key: the PEM private key (unencrypted).
    """

    cert: Path
    key: Path


def make_self_signed(directory: Path, name: str = "localhost") -> CertFiles:
    """
    Write a self-signed RSA-2048 certificate and its key, valid for a day.

    RSA-2048 is what most self-signed server certificates use; the key type
    dominates the cost of a TLS handshake, so the harness reports it.

    @param directory: where to write C{cert.pem} and C{key.pem}.
    @param name: the certificate's common name and DNS name.
    @return: the paths written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    files = CertFiles(cert=directory / "cert.pem", key=directory / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return files


def describe_key(cert_pem: bytes) -> str:
    """
    @param cert_pem: a PEM certificate.
    @return: its public key type and size, e.g. C{"RSA-2048"}.
    """
    public = x509.load_pem_x509_certificate(cert_pem).public_key()
    kind = type(public).__name__.replace("PublicKey", "").lstrip("_")
    size = getattr(public, "key_size", None)
    if size is None:
        curve = getattr(public, "curve", None)
        return f"{kind}-{curve.name}" if curve is not None else kind
    return f"{kind}-{size}"
