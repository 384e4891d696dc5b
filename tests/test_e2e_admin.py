"""
The admin app served by the real gateway (C{twistd -n smtpgw --admin ...}):
the first start makes an admin and logs its password once, the pages and
the API answer on the admin port with the same process and reactor.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway_process import Gateway, admin, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("admin-e2e") / "data"
    gw = Gateway(data, free_port(), admin_port=free_port())
    gw.start()
    gw.wait_admin()
    yield gw
    gw.stop()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (loopback)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_first_start_logs_the_admin_password_once(gateway: Gateway) -> None:
    """
    The first start logs a password for "admin"; a restart logs none.
    """
    password = gateway.first_admin_password()
    assert len(password) >= 20
    gateway.stop()
    gateway.start()
    gateway.wait_admin()
    assert gateway.log_text().count("with the password") == 1


def test_pages_and_api_answer_on_the_admin_port(gateway: Gateway) -> None:
    """
    The login page is served; pages redirect to it; the API needs a token
    made by C{smtpgw-admin token add} and then lists the lists.
    """
    code, body = _get(gateway.admin_url + "/login")
    assert code == 200
    assert b"Log in" in body
    code, _ = _get(gateway.admin_url + "/api/v1/lists")
    assert code == 401
    admin(gateway.data_dir, "list", "add", "news")
    token = admin(gateway.data_dir, "token", "add", "e2e")["token"]
    code, body = _get(gateway.admin_url + "/api/v1/lists", {"Authorization": f"Bearer {token}"})
    assert code == 200
    assert [item["name"] for item in json.loads(body)["lists"]] == ["news"]
    code, body = _get(gateway.admin_url + "/healthz")
    assert code == 200
    assert json.loads(body)["checks"] == {"journal": True, "queue": True, "smtp": True}


def test_a_busy_admin_port_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    """
    An admin port that cannot be bound is reported and the gateway does
    not run half-started.
    """
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = Gateway(tmp_path / "data", free_port(), admin_port=port)
        with pytest.raises(AssertionError, match="exited"):
            gw.start(timeout=30)
        assert "Address already in use" in gw.log_text() or "in use" in gw.log_text()


def test_metrics_count_what_the_gateway_did(gateway: Gateway) -> None:
    """
    /metrics (with a token) counts a refused MAIL before AUTH and shows the
    queue and journal series.
    """
    import smtplib

    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.ehlo("metrics.test")
        code, _ = client.mail("someone@example.com")
        assert code == 530
    token = admin(gateway.data_dir, "token", "add", "scraper")["token"]
    code, body = _get(gateway.admin_url + "/metrics", {"Authorization": f"Bearer {token}"})
    assert code == 200
    text = body.decode()
    assert 'smtpgw_messages_rejected_total{reason="auth_required"} 1.0' in text
    assert "smtpgw_journal_fsync_seconds_bucket" in text
    assert 'smtpgw_queue_messages{priority="1"}' in text
