"""
The JSON API against its own OpenAPI document: schemathesis, run against
the real gateway on loopback with every check (no server error, status
codes, content types and response bodies as documented, invalid data
refused and valid data accepted, 405 with Allow for undocumented methods,
authentication enforced), bounded and deterministic.

The gateway has a list, an SMTP+ user and messages waiting in a stopped
queue, so that the routes under a list, a user and a queue id have
something real to work on (the document's links lead schemathesis from
the listings to them).
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_process import BIN, Gateway, add_user, admin, free_port

pytestmark = pytest.mark.e2e

SCHEMATHESIS = str(BIN / "schemathesis")
#: Test cases per operation and phase: enough to reach every branch of the
#: validation, few enough for the whole run to take well under a minute.
MAX_EXAMPLES = 10
#: Messages waiting in the queue, for the routes about one (some are
#: cancelled early on).
WAITING = 6
#: The whole run may not take longer than this.
RUN_TIMEOUT = 120.0
#: Every check. The statuses that may answer valid and invalid requests
#: are those the document gives, stricter than schemathesis' defaults
#: (never a redirect, a 403, a 422, a 5xx or a rate limit); 413 is
#: documented for every body: a user's 1000 authorized domains or senders
#: (valid, or one too many) can be more than the site's body limit. A CSV
#: body is text whatever schemathesis meant to send: an "invalid" one (an
#: object, say) goes out as text, and any text is a file the import
#: answers about, so that one check cannot apply to the import.
CONFIG = """
[checks]
enabled = true

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "404", "409", "413"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "404", "405", "409", "413", "415"]

[[operations]]
include-operation-id = "recipients_import"
checks.negative_data_rejection.enabled = false
"""


def _call(gateway: Gateway, token: str, method: str, path: str) -> Any:
    request = urllib.request.Request(  # noqa: S310 (loopback)
        gateway.admin_url + "/api/v1" + path,
        method=method,
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.loads(response.read())


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    data = tmp_path_factory.mktemp("api-schema") / "data"
    # Deliveries to a closed loopback port fail for now and are retried
    # later: the messages stay in the queue for the routes about one.
    gw = Gateway(
        data, free_port(), admin_port=free_port(), relay=f"smtp://127.0.0.1:{free_port()}"
    )
    gw.start()
    gw.wait_admin()
    token = admin(data, "token", "add", "schemathesis")["token"]
    user = add_user(data, "news", "--domains", "example.com")
    _call(gw, token, "POST", "/queue/stop")
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
        client.login(user.username, user.password)
        for n in range(WAITING):
            client.sendmail(
                "app@example.com",
                [f"r{n}@example.org"],
                f"From: app@example.com\r\nSubject: waiting {n}\r\n\r\nbody {n}\r\n",
            )
    assert len(_call(gw, token, "GET", "/queue")["messages"]) == WAITING
    yield gw, token
    gw.stop()


def test_the_api_conforms_to_its_openapi_document(
    gateway: tuple[Gateway, str], tmp_path: Path
) -> None:
    """
    Schemathesis finds no failure of any check on any operation of the
    document the gateway serves.
    """
    gw, token = gateway
    # Only loopback: no proxy, whatever the environment says.
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = "*"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    started = time.monotonic()
    result = subprocess.run(
        [
            SCHEMATHESIS,
            "--no-color",
            "--config-file",
            str(config),
            "run",
            f"{gw.admin_url}/api/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--generation-deterministic",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--max-response-time",
            "5",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    elapsed = time.monotonic() - started
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    tested = re.search(r"Tested: (\d+)", report)
    assert tested is not None, report
    # Every operation but the document's own, which schemathesis loads.
    assert int(tested.group(1)) == _operations() - 1, report
    assert elapsed < 60, f"schemathesis took {elapsed:.0f} s\n{report}"


def _operations() -> int:
    document = json.loads((Path(__file__).parent.parent / "web" / "openapi.json").read_text())
    methods = {"get", "post", "patch", "delete", "put"}
    return sum(1 for item in document["paths"].values() for method in item if method in methods)
