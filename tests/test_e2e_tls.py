"""
End-to-end: STARTTLS with given certificate files, reloaded on SIGHUP
without dropping established connections; AUTH held back until STARTTLS
with --require-tls.
"""

from __future__ import annotations

import shutil
import signal
import smtplib
from pathlib import Path

import pytest

from smtpgw.tls import ensure_self_signed
from tests.gateway_process import (
    Gateway,
    add_user,
    fingerprint_of,
    free_port,
    peer_fingerprint,
    unverified,
    wait_until,
)

pytestmark = pytest.mark.e2e


def make_pair(where: Path, hostname: str) -> tuple[Path, Path]:
    cert, key = ensure_self_signed(str(where), hostname)
    return Path(cert.path), Path(key.path)


def test_sighup_reloads_the_certificate_without_dropping_connections(tmp_path: Path) -> None:
    """
    After the files are replaced and SIGHUP sent, new connections get the
    new certificate while a session opened before keeps working.
    """
    cert_a, key_a = make_pair(tmp_path / "a", "first.test")
    cert_b, key_b = make_pair(tmp_path / "b", "second.test")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(cert_a, live_cert)
    shutil.copy(key_a, live_key)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    gw = Gateway(
        data_dir,
        free_port(),
        extra_args=("--tls-cert", str(live_cert), "--tls-key", str(live_key)),
    )
    gw.start()
    try:
        user = add_user(data_dir, "tls", "--domains", "example.com")
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as before:
            before.starttls(context=unverified())
            before.login(user.username, user.password)
            assert peer_fingerprint(before) == fingerprint_of(cert_a)

            shutil.copy(cert_b, live_cert)
            shutil.copy(key_b, live_key)
            assert gw.process is not None
            gw.process.send_signal(signal.SIGHUP)

            def new_connections_see_b() -> bool:
                with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as after:
                    after.starttls(context=unverified())
                    return peer_fingerprint(after) == fingerprint_of(cert_b)

            wait_until(new_connections_see_b, 15, "the new certificate")
            # The session opened before the reload still sends.
            refused = before.sendmail(
                "app@example.com", ["x@dest.test"], "From: app@example.com\r\n\r\nhi\r\n"
            )
            assert refused == {}
            assert peer_fingerprint(before) == fingerprint_of(cert_a)
        gw.wait_delivered(1)
        assert "TLS certificate reloaded" in gw.log_text()
    finally:
        assert gw.stop(), gw.log_tail()


def test_require_tls_offers_auth_only_after_starttls(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    gw = Gateway(data_dir, free_port(), extra_args=("--require-tls",))
    gw.start()
    try:
        user = add_user(data_dir, "tls", "--domains", "example.com")
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            client.ehlo("c.test")
            assert "starttls" in client.esmtp_features
            assert "auth" not in client.esmtp_features
            code, reply = client.docmd("AUTH", "PLAIN AGEAYg==")
            assert (code, reply[:5]) == (530, b"5.7.0"), reply
            client.starttls(context=gw.tls_context())
            client.ehlo("c.test")
            assert "PLAIN" in client.esmtp_features["auth"]
            client.login(user.username, user.password)
    finally:
        assert gw.stop(), gw.log_tail()


def test_a_broken_certificate_file_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    bad_cert, bad_key = tmp_path / "bad.crt", tmp_path / "bad.key"
    bad_cert.write_text("not a certificate\n")
    bad_key.write_text("not a key\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    gw = Gateway(
        data_dir,
        free_port(),
        extra_args=("--tls-cert", str(bad_cert), "--tls-key", str(bad_key)),
    )
    with pytest.raises(AssertionError, match="gateway exited"):
        gw.start(timeout=30)
    assert str(bad_cert) in gw.log_text()
