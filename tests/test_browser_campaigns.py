"""
A console send made and watched in a real headless Chromium against the
real gateway (C{twistd -n smtpgw --admin ... --rate 40 --relay capture}),
as an admin goes about it: a list and its priority-1 SMTP+ user
authorizing example.com made in the pages; recipients pasted as CSV (a bad row shown
by its line and nothing imported, then the valid rows imported); a send
refused for its sender beside the field, then saved at priority 3; its
progress growing on its page, which reloads itself; paused by the admin
(with the reason), resumed, paused by itself while priority-1 SMTP+ mail
goes out (with that reason), finished with every recipient delivered once;
and an unsubscribe link from a delivered message followed without a login.

Screenshots (see L{tests.browser_support}): the recipients page with the
bad row and after the import, the new-send form with the sender refused,
the send's page while sending, paused by the admin, paused by priority-1
traffic and finished, the listing of sends, and the unsubscribe page.

The steps run in order in one test: each needs the one before, and the
send runs for a few tens of seconds at the gateway's rate.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
from attrs import define

from tests.browser_support import (
    AdminBrowser,
    admin_browser_fixture,  # noqa: F401 (a fixture)
    driver_fixture,  # noqa: F401 (a fixture)
    need_browser,
    screenshots_fixture,  # noqa: F401 (a fixture)
)
from tests.gateway_process import Credentials, Gateway, free_port, wait_until

LIST_NAME = "promo"
RATE = 40
#: More than the runner keeps of a send in the queue at once (its window of
#: 256), so that "sent" keeps growing at the gateway's rate for a while.
RECIPIENTS = 800
SENDER = "news@example.com"
REFUSED_SENDER = "boss@elsewhere.org"
#: How long the send may take, all told (800 at 40/s is 20 s).
SEND_SECONDS = 120.0
#: Priority-1 messages sent over SMTP while the send runs.
URGENT = 40
#: How long a send stays paused after the last of them: longer than a
#: reload of its page, so that the page shows it.
GRACE = 4
PREEMPTED = "priority-1 SMTP+ traffic"


@pytest.fixture(scope="module", name="browser_gateway")
def browser_gateway_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """
    The real gateway with its admin app, sending at most L{RATE} messages
    a second, so that a send's progress can be watched.
    """
    need_browser()
    data = tmp_path_factory.mktemp("browser-campaigns") / "data"
    gateway = Gateway(
        data,
        free_port(),
        extra_args=("--rate", str(RATE), "--preemption-grace", str(GRACE)),
        admin_port=free_port(),
    )
    gateway.start()
    try:
        gateway.wait_admin()
        yield gateway
    finally:
        if gateway.process is not None:
            assert gateway.stop(), gateway.log_tail()


def recipients_csv() -> str:
    """
    The recipients as pasted: a header, L{RECIPIENTS} good rows, and one
    bad row (line 4).
    """
    rows = [f"reader{n:04d}@example.org,Reader {n}" for n in range(RECIPIENTS)]
    rows.insert(2, "not an address,Nobody")
    return "email,name\n" + "\n".join(rows) + "\n"


def text_of(web: AdminBrowser, css: str) -> str | None:
    """
    The text of an element of the page shown now, or L{None} while the page
    is reloading (it reloads itself while a send runs).
    """
    from selenium.common.exceptions import NoSuchElementException, WebDriverException

    try:
        found: str = web.find(css).text
    except (NoSuchElementException, WebDriverException):
        return None
    return found


def number_of(web: AdminBrowser, css: str) -> int | None:
    text = text_of(web, css)
    return int(text) if text is not None and text.isdigit() else None


def wait_text(web: AdminBrowser, css: str, wanted: str, timeout: float = SEND_SECONDS) -> None:
    wait_until(lambda: text_of(web, css) == wanted, timeout, f"{css} to say {wanted!r}")


def send_urgent_mail(gateway: Gateway, user: Credentials, count: int) -> None:
    """
    Send C{count} messages over SMTP as a priority-1 SMTP+ user would.
    """
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        client.ehlo("browser.test")
        client.starttls(context=gateway.tls_context())
        client.ehlo("browser.test")
        client.login(user.username, user.password)
        for n in range(count):
            client.sendmail(
                "alerts@example.com",
                [f"oncall{n}@dest.test"],
                f"From: alerts@example.com\r\nTo: oncall{n}@dest.test\r\n"
                f"Subject: Urgent {n}\r\n\r\nNow.\r\n",
            )


@define
class Progress:
    """
    What the send's page showed of the send as it ran.
    """

    sent: list[int]
    total: int | None


def paste(web: AdminBrowser, css: str, text: str) -> None:
    """
    Put text in a text box as a paste does (typing 30 KB key by key would
    take a while).
    """
    web.driver.execute_script("arguments[0].value = arguments[1];", web.find(css), text)


def captured_messages(gateway: Gateway) -> list[Any]:
    return [
        email.message_from_bytes(
            (gateway.captured / entry["file"]).read_bytes(), policy=email.policy.default
        )
        for entry in gateway.index()
    ]


@pytest.mark.browser
@pytest.mark.e2e
def test_a_console_send_made_watched_paused_and_finished_in_the_pages(
    admin_browser: AdminBrowser, browser_gateway: Gateway
) -> None:
    web = admin_browser
    gateway = browser_gateway
    web.ensure_logged_in()

    # A list, and an SMTP+ user that authorizes example.com.
    web.open("/lists")
    web.fill("#new-list input[name=name]", LIST_NAME)
    web.submit("#new-list button[type=submit]")
    assert web.path() == f"/lists/{LIST_NAME}", web.path()
    web.click_and_load("#add-user")
    web.fill("input[name=authorized_domains]", "example.com")
    web.choose("select[name=priority]", "1")
    web.submit("#save-user")
    assert web.path().startswith("/users/"), web.path()
    urgent = Credentials(web.path().rsplit("/", 1)[-1], web.wait_for("#new-password").text)

    # Recipients pasted: the bad row is shown by its line, nothing imported.
    web.open(f"/lists/{LIST_NAME}")
    web.click_and_load("#recipients-link")
    assert web.path() == f"/lists/{LIST_NAME}/recipients"
    paste(web, "#f-csv", recipients_csv())
    web.submit("#import-submit")
    errors = web.find_all("#import-errors li")
    assert [e.get_attribute("data-line") for e in errors] == ["4"]
    assert "invalid address 'not an address'" in errors[0].text
    assert web.find("#count-subscribed").text == "0"
    assert web.find("#import-valid").text == f"Import the {RECIPIENTS} valid rows"
    web.screenshot("recipients-import-errors")
    web.submit("#import-valid")
    assert web.path() == f"/lists/{LIST_NAME}/recipients"
    assert f"Imported {RECIPIENTS} recipients" in web.find(".notice.good").text
    assert "Skipped 1 bad row (line 4)" in web.find(".notice.good").text
    assert web.find("#count-subscribed").text == str(RECIPIENTS)
    assert web.find_all("#import-errors") == []
    web.screenshot("recipients")

    # A new send: a sender the list's policy refuses is shown beside the field.
    web.click_and_load("#new-send-for-list")
    assert web.path() == f"/campaigns/new?list={LIST_NAME}"
    web.fill("#new-campaign input[name=subject]", "Spring news for {{name}}")
    web.fill("#new-campaign textarea[name=text]", "Hello {{name}},\nspring is here.")
    web.fill("#new-campaign input[name=sender]", REFUSED_SENDER)
    web.submit("#save-campaign")
    error = web.field_error("sender")
    assert error is not None, "no error beside the sender"
    assert error.is_displayed()
    assert f"{REFUSED_SENDER} may not send for list {LIST_NAME}" in error.text
    assert web.find("#new-campaign input[name=subject]").get_attribute("value") == (
        "Spring news for {{name}}"
    )
    web.screenshot("campaign-new-error")
    web.fill("#new-campaign input[name=sender]", SENDER)
    web.choose("#new-campaign select[name=priority]", "3")
    web.submit("#save-campaign")
    path = web.path()
    assert path.startswith("/campaigns/"), path
    number = path.rsplit("/", 1)[-1]
    assert number.isdigit(), path

    # Its progress grows as the page reloads itself.
    wait_text(web, "#campaign-state", "sending", 30)
    progress = Progress([], None)

    def grew() -> bool:
        sent = number_of(web, "#campaign-sent")
        if sent is not None and (not progress.sent or sent != progress.sent[-1]):
            progress.sent.append(sent)
            progress.total = number_of(web, "#campaign-total")
        return len(progress.sent) >= 2 and progress.sent[-1] > progress.sent[0]

    wait_until(grew, 30, "the send's progress to grow on its page")
    assert progress.total == RECIPIENTS
    assert progress.sent[-1] < RECIPIENTS, "the send ended before it could be watched"
    assert web.find("#campaign-status").get_attribute("data-refresh") == "2"
    bar = web.find("#campaign-progress")
    assert bar.get_attribute("max") == str(RECIPIENTS)
    web.screenshot("campaign-sending")

    # Paused by the admin: the state and the reason, and it stays so.
    wait_until(lambda: bool(web.find_all("#campaign-pause")), 10, "the pause button")
    web.submit("#campaign-pause")
    wait_text(web, "#campaign-state", "paused", 10)
    assert text_of(web, "#campaign-paused-reason") == "paused by an admin"
    assert web.find_all("#campaign-resume")
    at_pause = number_of(web, "#campaign-sent")
    assert at_pause is not None
    assert at_pause < RECIPIENTS
    web.screenshot("campaign-paused")
    delivered = len(gateway.index())
    from selenium.common.exceptions import WebDriverException

    # Two reloads later it is still paused, and nothing more was handed on.
    reloads = 0

    def reloaded_twice() -> bool:
        # A mark left on the page is gone once it has reloaded.
        nonlocal reloads
        try:
            if not web.find_all("#campaign-state"):
                return False
            if web.driver.execute_script("return window.smtpgwSeen === undefined;"):
                reloads += 1
                web.driver.execute_script("window.smtpgwSeen = true;")
        except WebDriverException:
            return False
        return reloads >= 3

    wait_until(reloaded_twice, 15, "the paused page to reload itself")
    wait_text(web, "#campaign-state", "paused", 5)
    assert number_of(web, "#campaign-sent") == at_pause
    assert text_of(web, "#campaign-paused-reason") == "paused by an admin"
    # Deliveries already under way at the pause may end; no new one starts.
    settled = len(gateway.index())
    assert settled - delivered <= 20, (delivered, settled)

    # Resumed, it goes on and finishes.
    wait_until(lambda: bool(web.find_all("#campaign-resume")), 10, "the resume button")
    web.submit("#campaign-resume")
    assert web.find(".notice.good").text.startswith(f"Console send #{number} resumed")
    wait_text(web, "#campaign-state", "sending", 10)

    # Priority-1 SMTP+ mail pauses it by itself, with the reason, until it is sent.
    send_urgent_mail(gateway, urgent, URGENT)
    wait_text(web, "#campaign-paused-reason", PREEMPTED, 15)
    assert text_of(web, "#campaign-state") == "paused"
    # The runner's pause is not the admin's: there is nothing to resume.
    assert web.find_all("#campaign-resume") == []
    web.screenshot("campaign-paused-by-priority-1")
    wait_text(web, "#campaign-state", "finished", SEND_SECONDS)
    assert number_of(web, "#campaign-sent") == RECIPIENTS
    assert web.find("#campaign-status").get_attribute("data-refresh") is None
    assert web.find_all("#campaign-pause") == []
    web.screenshot("campaign-finished")

    # Every recipient got it once, from the sender, and the urgent mail went too.
    index = gateway.wait_delivered(RECIPIENTS + URGENT, SEND_SECONDS)
    sent = [entry for entry in index if entry["priority"] == 3]
    recipients = [r for entry in sent for r in entry["recipients"]]
    assert len(recipients) == RECIPIENTS
    assert set(recipients) == {f"reader{n:04d}@example.org" for n in range(RECIPIENTS)}
    assert {entry["sender"] for entry in sent} == {SENDER}
    urgent_sent = [entry for entry in index if entry["priority"] == 1]
    assert len(urgent_sent) == URGENT
    assert {entry["username"] for entry in urgent_sent} == {urgent.username}

    # Its listing.
    web.open("/campaigns")
    rows = web.rows("#campaigns")
    assert rows[0][0] == f"#{number}"
    assert "finished" in rows[0][3]
    assert f"{RECIPIENTS} / {RECIPIENTS}" in rows[0][4]
    web.screenshot("campaigns")

    # The unsubscribe link of a message works without a login.
    message = next(m for m in captured_messages(gateway) if m["To"] == "reader0007@example.org")
    link = str(message["List-Unsubscribe"]).strip("<>")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    token = link.rsplit("/unsubscribe/", 1)[1]
    web.logout()
    web.open(f"/unsubscribe/{token}")
    assert web.find("#unsubscribe-email").text == "r…@example.org"
    assert web.find("#unsubscribe-list").text == LIST_NAME
    web.screenshot("unsubscribe")
    web.submit("#unsubscribe-submit")
    assert "is unsubscribed from promo" in web.find("#unsubscribe-done").text
    web.ensure_logged_in()
    web.open(f"/lists/{LIST_NAME}/recipients")
    assert web.find("#count-unsubscribed").text == "1"
    assert web.find("#count-subscribed").text == str(RECIPIENTS - 1)
    assert web.console_errors() == []


def test_the_csv_has_one_bad_row_on_line_4() -> None:
    """
    The pasted recipients have the bad row where the test looks for it.
    """
    lines = recipients_csv().splitlines()
    assert lines[3] == "not an address,Nobody"
    assert len(lines) == RECIPIENTS + 2
