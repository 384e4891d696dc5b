"""
The admin pages in a real headless Chromium against the real gateway
(C{twistd -n smtpgw --admin ...}), as an admin meets them: logging in and
out; a list, its SMTP+ settings and an SMTP+ user added, edited (a bad
domain refused beside the field), its password shown once, regenerated and
checked over SMTP, given priority 1, deleted; the same without JavaScript;
the queue, the alert center and the API tokens with something in them.
Screenshots of the main pages are saved as test artifacts (see
L{tests.browser_support}).

The tests of the module share one gateway and one browser, so the whole
module takes a few tens of seconds; the steps that need an earlier one
(a list, a user) get it from a module fixture, so each test also runs alone.
"""

from __future__ import annotations

import json
import smtplib
import urllib.request
from pathlib import Path

import pytest
from attrs import define, field

from tests.browser_support import (
    ADMIN_NAME,
    AdminBrowser,
    admin_browser_fixture,  # noqa: F401 (a fixture)
    artifacts_dir,
    browser_gateway_fixture,  # noqa: F401 (a fixture)
    driver_fixture,  # noqa: F401 (a fixture)
    need_browser,
    screenshots_fixture,  # noqa: F401 (a fixture)
    smtp_auth_plain,
    start_driver,
)
from tests.gateway_process import Credentials, Gateway, add_user

ERROR_TITLES = {"Not found", "Bad request", "Refused", "Conflict", "Error"}


def test_a_missing_browser_skips_on_a_developer_machine(tmp_path: Path) -> None:
    """
    Without Chromium the browser tests are skipped, with the reason, when
    C{CI} is not C{true}.
    """
    with pytest.raises(pytest.skip.Exception, match="chromium"):
        need_browser(chromium=tmp_path / "chromium", environ={})
    with pytest.raises(pytest.skip.Exception, match="chromedriver"):
        need_browser(chromedriver=tmp_path / "chromedriver", environ={"CI": "false"})


def test_a_missing_browser_fails_under_ci(tmp_path: Path) -> None:
    """
    With C{CI=true} a missing browser or driver fails the test: CI never
    passes by skipping.
    """
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        need_browser(chromium=tmp_path / "chromium", environ={"CI": "true"})
    with pytest.raises(pytest.fail.Exception, match="chromium-driver"):
        need_browser(chromedriver=tmp_path / "chromedriver", environ={"CI": "true"})


def test_screenshots_go_to_the_configured_artifacts_folder(tmp_path: Path) -> None:
    """
    C{$SMTPGW_ARTIFACTS} names the screenshots' folder, made when missing;
    without it they go under the repository's C{test-artifacts/}.
    """
    configured = tmp_path / "artifacts" / "shots"
    assert artifacts_dir({"SMTPGW_ARTIFACTS": str(configured)}) == configured
    assert configured.is_dir()
    default = artifacts_dir({})
    assert default.parts[-2:] == ("test-artifacts", "screenshots")
    assert default.parent.parent == Path(__file__).resolve().parent.parent


@pytest.mark.browser
@pytest.mark.e2e
def test_the_login_page_refuses_a_wrong_password(admin_browser: AdminBrowser) -> None:
    """
    A wrong password keeps the visitor on the login page, with the error
    beside the password field, and without a session.
    """
    web = admin_browser
    web.open("/lists")
    assert web.path().startswith("/login"), web.path()
    web.screenshot("login")
    web.login(ADMIN_NAME, web.password + "-wrong")
    assert web.path().startswith("/login"), web.path()
    error = web.find("#error-password")
    assert error.is_displayed()
    assert "Wrong admin name or password" in error.text
    assert not web.logged_in()
    web.screenshot("login-refused")
    web.open("/")
    assert web.path().startswith("/login"), web.path()
    assert web.console_errors() == []


@pytest.mark.browser
@pytest.mark.e2e
def test_the_password_of_the_first_start_logs_in(admin_browser: AdminBrowser) -> None:
    """
    The password the first start logged opens the overview, with the
    admin's name and a logout button in the header.
    """
    web = admin_browser
    web.login()
    assert web.path() == "/"
    assert web.heading() == "Overview"
    assert web.logged_in()
    assert ADMIN_NAME in web.find("header.top .account").text
    web.screenshot("overview")
    assert web.console_errors() == []


@pytest.mark.browser
@pytest.mark.e2e
def test_logging_out_ends_the_session(admin_browser: AdminBrowser) -> None:
    """
    Logging out leads to the login page, and the old session cookie, put
    back into the browser, no longer opens any page: the session ended on
    the server, not only in the browser.
    """
    web = admin_browser
    web.ensure_logged_in()
    cookie = web.driver.get_cookie("smtpgw_session")
    assert cookie is not None
    web.logout()
    assert web.path().startswith("/login"), web.path()
    assert not web.logged_in()
    web.open("/lists")
    assert web.path().startswith("/login"), web.path()
    web.driver.delete_cookie("smtpgw_session")
    web.driver.add_cookie({"name": cookie["name"], "value": cookie["value"], "path": "/"})
    web.open("/lists")
    assert web.path().startswith("/login"), web.path()
    assert not web.logged_in()


# -- a list and its SMTP+ users, as an admin meets them --------------------

LIST_NAME = "newsletter"
GOOD_DOMAINS = "example.com;mail.example.com"
BAD_DOMAINS = "not a domain;;"
NOTES = "Made by the browser test."


@define
class NewUser:
    """
    What the browser showed while adding an SMTP+ user.

    @ivar add_error: the text of the error beside the domains field when the
        add form was sent with a bad domain, or L{None} if none was beside it.
    @ivar page: the path the saved form led to (the user's page).
    """

    username: str
    password: str = field(repr=False)
    copy_button_shown: bool
    add_error: str | None
    page: str


@pytest.fixture(scope="module", name="mail_list")
def mail_list_fixture(admin_browser: AdminBrowser) -> str:
    """
    A list made with the form of the lists page (which leads to the new
    list's SMTP+ settings page).
    """
    web = admin_browser
    web.ensure_logged_in()
    web.open("/lists")
    web.fill("#new-list input[name=name]", LIST_NAME)
    web.submit("#new-list button[type=submit]")
    assert web.path() == f"/lists/{LIST_NAME}", web.path()
    return LIST_NAME


@pytest.fixture(scope="module", name="new_user")
def new_user_fixture(admin_browser: AdminBrowser, mail_list: str) -> NewUser:
    """
    An SMTP+ user added from the list's page: the add form is first sent
    with a bad domain, then corrected and saved; the password shown is read
    once.
    """
    web = admin_browser
    web.ensure_logged_in()
    web.open(f"/lists/{mail_list}")
    web.click_and_load("#add-user")
    web.fill("input[name=authorized_domains]", BAD_DOMAINS)
    web.submit("#save-user")
    error = web.field_error("authorized_domains")
    add_error = error.text if error is not None and error.is_displayed() else None
    web.screenshot("add-user-error")
    web.fill("input[name=authorized_domains]", GOOD_DOMAINS)
    web.fill("textarea[name=notes]", NOTES)
    web.submit("#save-user")
    password = web.wait_for("#new-password").text
    copy = web.find_all("[data-copy=new-password]")
    username = web.path().rsplit("/", 1)[-1]
    user = NewUser(
        username=username,
        password=password,
        copy_button_shown=bool(copy) and copy[0].is_displayed(),
        add_error=add_error,
        page=web.path(),
    )
    web.screenshot("user-new-password")
    return user


@pytest.mark.browser
@pytest.mark.e2e
def test_a_list_made_on_the_lists_page_is_listed(
    admin_browser: AdminBrowser, mail_list: str
) -> None:
    """
    The list made with the lists page's form is in its table, linking to
    the list's SMTP+ settings.
    """
    web = admin_browser
    web.open("/lists")
    assert web.find_all(f"main a[href='/lists/{mail_list}']")
    web.screenshot("lists")
    assert web.console_errors() == []


@pytest.mark.browser
@pytest.mark.e2e
def test_the_list_page_shows_the_smtp_settings(
    admin_browser: AdminBrowser, browser_gateway: Gateway, mail_list: str
) -> None:
    """
    The SMTP+ settings page of a list shows the server's address, its ports
    and the encryption, and the (empty) table of the list's users with the
    link to add one.
    """
    web = admin_browser
    web.open(f"/lists/{mail_list}")
    text = web.find("main").text
    assert "gateway.test" in text
    assert str(browser_gateway.port) in text
    assert "STARTTLS" in text
    assert web.find("table#users").is_displayed()
    assert web.find("#add-user").is_displayed()
    assert web.console_errors() == []


@pytest.mark.browser
@pytest.mark.e2e
def test_adding_a_user_shows_its_password_once(
    admin_browser: AdminBrowser, browser_gateway: Gateway, mail_list: str, new_user: NewUser
) -> None:
    """
    The add form refuses a bad domain with the error beside the field;
    saved, it leads to the user's page, which shows the generated password
    once, with a copy button (JavaScript is on). The password works over
    SMTP; a reload shows it no more, anywhere on the page. The list's
    table now has the user.
    """
    web = admin_browser
    assert new_user.add_error, "no error beside the domains field of the add form"
    assert new_user.page == f"/users/{new_user.username}"
    assert new_user.username.startswith(f"smtp-{mail_list}-")
    assert len(new_user.password) >= 16
    assert new_user.copy_button_shown
    assert smtp_auth_plain(browser_gateway, new_user.username, new_user.password) == 235
    web.open(new_user.page)
    assert web.find_all("#new-password") == []
    assert new_user.password not in web.driver.page_source
    web.open(f"/lists/{mail_list}")
    rows = [row for row in web.rows("#users") if row and row[0].startswith(new_user.username)]
    assert len(rows) == 1, web.rows("#users")
    assert "active" in rows[0]
    assert new_user.password not in web.driver.page_source
    web.screenshot("list-settings")
    assert web.console_errors() == []


@pytest.mark.browser
@pytest.mark.e2e
def test_a_bad_domain_is_shown_beside_the_field(
    admin_browser: AdminBrowser, new_user: NewUser
) -> None:
    """
    On the user's page, a bad authorized domain is refused: the error is
    beside the domains field, which still holds what was typed; the user
    keeps its domains.
    """
    web = admin_browser
    web.open(f"/users/{new_user.username}")
    web.fill("input[name=authorized_domains]", BAD_DOMAINS)
    web.submit("#save-user")
    error = web.field_error("authorized_domains")
    assert error is not None, "no #error-authorized_domains beside the field"
    assert error.is_displayed()
    assert error.text
    domains = web.find("input[name=authorized_domains]")
    assert domains.is_displayed()
    assert domains.get_attribute("value") == BAD_DOMAINS
    web.screenshot("edit-user-error")
    web.open(f"/users/{new_user.username}")
    assert web.find("input[name=authorized_domains]").get_attribute("value") == GOOD_DOMAINS
    assert web.console_errors() == []


@pytest.mark.browser
@pytest.mark.e2e
def test_regenerating_shows_a_new_password_once(
    admin_browser: AdminBrowser, browser_gateway: Gateway, new_user: NewUser
) -> None:
    """
    Regenerating shows a new, different password once; over SMTP the old
    one stops working and the new one works.
    """
    web = admin_browser
    assert smtp_auth_plain(browser_gateway, new_user.username, new_user.password) == 235
    web.open(f"/users/{new_user.username}")
    assert web.find_all("#new-password") == []
    web.submit("#regenerate")
    assert web.path() == f"/users/{new_user.username}"
    fresh = web.wait_for("#new-password").text
    assert fresh
    assert fresh != new_user.password
    assert web.find("[data-copy=new-password]").is_displayed()
    web.screenshot("user-regenerated")
    web.driver.refresh()
    assert web.find_all("#new-password") == []
    assert fresh not in web.driver.page_source
    assert smtp_auth_plain(browser_gateway, new_user.username, new_user.password) == 535
    assert smtp_auth_plain(browser_gateway, new_user.username, fresh) == 235
    new_user.password = fresh
    assert web.console_errors() == []


@pytest.mark.browser
@pytest.mark.e2e
def test_priority_1_shows_in_the_users_table(
    admin_browser: AdminBrowser, mail_list: str, new_user: NewUser
) -> None:
    """
    Priority 1 saved on the user's page shows as "1" and "very high" in the
    user's row of the list's table.
    """
    web = admin_browser
    web.open(f"/users/{new_user.username}")
    web.choose("select[name=priority]", "1")
    web.submit("#save-user")
    assert web.field_error("priority") is None
    web.open(f"/lists/{mail_list}")
    rows = [row for row in web.rows("#users") if row and row[0].startswith(new_user.username)]
    assert len(rows) == 1, web.rows("#users")
    priority = [cell for cell in rows[0] if "very high" in cell]
    assert priority, rows[0]
    assert priority[0].split()[0] == "1", priority[0]
    web.screenshot("list-settings-priority")
    assert web.console_errors() == []


@pytest.mark.browser
@pytest.mark.e2e
def test_deleting_a_user_asks_for_confirmation(
    admin_browser: AdminBrowser, browser_gateway: Gateway, mail_list: str, new_user: NewUser
) -> None:
    """
    The Delete link in the user's row leads to a confirmation page; once
    confirmed the user is gone from the list's table and its password no
    longer works over SMTP.
    """
    web = admin_browser
    web.open(f"/lists/{mail_list}")
    web.click_and_load(f"#users a[href='/users/{new_user.username}/delete']")
    assert web.path() == f"/users/{new_user.username}/delete"
    assert new_user.username in web.find("main").text
    web.screenshot("delete-user-confirm")
    web.submit("#confirm-delete")
    assert web.path() == f"/lists/{mail_list}"
    assert not [row for row in web.rows("#users") if row and row[0].startswith(new_user.username)]
    assert smtp_auth_plain(browser_gateway, new_user.username, new_user.password) == 535
    assert web.console_errors() == []


@pytest.mark.browser
@pytest.mark.e2e
def test_without_javascript_a_user_is_added_and_its_password_shown(
    browser_gateway: Gateway, screenshots: Path, mail_list: str
) -> None:
    """
    With JavaScript off, logging in and the add-user form still work, and
    the new password is shown; the copy button, which needs a script,
    stays hidden.
    """
    plain = start_driver(javascript=False)
    try:
        web = AdminBrowser(
            plain, browser_gateway.admin_url, browser_gateway.first_admin_password(), screenshots
        )
        web.login()
        assert web.logged_in()
        web.open(f"/lists/{mail_list}")
        web.click_and_load("#add-user")
        web.fill("input[name=authorized_domains]", "example.org")
        web.submit("#save-user")
        assert web.path().startswith(f"/users/smtp-{mail_list}-")
        shown = web.find("#new-password")
        assert shown.is_displayed()
        assert smtp_auth_plain(browser_gateway, web.path().rsplit("/", 1)[-1], shown.text) == 235
        copy = web.find("[data-copy=new-password]")
        # Only a script takes the attribute away.
        assert copy.get_attribute("hidden") is not None
        assert not copy.is_displayed(), "the stylesheet shows elements marked hidden"
        web.screenshot("user-new-password-no-javascript")
    finally:
        plain.quit()


# -- the queue, the alerts and the API tokens, with something in them ------


@pytest.fixture(scope="module", name="sender")
def sender_fixture(browser_gateway: Gateway, mail_list: str) -> Credentials:
    """
    An SMTP+ user of the list allowed to send from example.com, made with
    C{smtpgw-admin} (the pages' own flow is tested above).
    """
    return add_user(browser_gateway.data_dir, mail_list, "--domains", "example.com")


def _smtp_session(gateway: Gateway, user: Credentials) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gateway.port, timeout=30)
    client.ehlo("browser.test")
    client.starttls(context=gateway.tls_context())
    client.ehlo("browser.test")
    client.login(user.username, user.password)
    return client


@pytest.mark.browser
@pytest.mark.e2e
def test_the_queue_page_stops_and_restarts_the_queue(
    admin_browser: AdminBrowser, browser_gateway: Gateway, sender: Credentials
) -> None:
    """
    Stopped from the queue page, the queue keeps a message sent over SMTP,
    which the page lists with its subject; restarted, the message is sent.
    """
    web = admin_browser
    web.ensure_logged_in()
    web.open("/queue")
    assert web.find("#queue-state").text == "running"
    web.submit("#queue-stop")
    assert web.find("#queue-state").text == "stopped"
    with _smtp_session(browser_gateway, sender) as client:
        client.sendmail(
            "app@example.com",
            ["reader@dest.test"],
            "From: app@example.com\r\nTo: reader@dest.test\r\n"
            "Subject: Held by the browser test\r\n\r\nHello.\r\n",
        )
    web.open("/queue")
    rows = web.find_all("#queue tbody tr[id^=msg-]")
    assert len(rows) == 1
    assert "Held by the browser test" in rows[0].text
    assert web.find("#queue-waiting").text == "1"
    web.screenshot("queue")
    assert web.console_errors() == []
    web.submit("#queue-start")
    assert web.find("#queue-state").text == "running"
    delivered = browser_gateway.wait_delivered(1)
    assert len(delivered) == 1


@pytest.mark.browser
@pytest.mark.e2e
def test_the_alert_center_shows_a_refused_sender(
    admin_browser: AdminBrowser, browser_gateway: Gateway, mail_list: str, sender: Credentials
) -> None:
    """
    A sender the user is not authorized for is refused over SMTP, and the
    alert center shows the alert, with the list and the address.
    """
    web = admin_browser
    web.ensure_logged_in()
    with _smtp_session(browser_gateway, sender) as client:
        code, _ = client.mail("mallory@evil.test")
    assert code == 550

    def alert_shown(_: object) -> bool:
        web.open("/alerts")
        return "mallory@evil.test" in web.find("#alerts").text

    web.wait(alert_shown, "the sender alert in the alert center")
    rows = [row for row in web.rows("#alerts") if "mallory@evil.test" in " ".join(row)]
    assert rows
    assert mail_list in rows[0]
    web.screenshot("alerts")
    assert web.console_errors() == []


@pytest.mark.browser
@pytest.mark.e2e
def test_a_token_made_on_the_tokens_page_is_shown_once_and_opens_the_api(
    admin_browser: AdminBrowser, browser_gateway: Gateway, mail_list: str
) -> None:
    """
    A token made on the tokens page is shown once with a copy button, opens
    the JSON API (which lists the list), and is not shown again on reload.
    """
    web = admin_browser
    web.ensure_logged_in()
    web.open("/tokens")
    web.fill("#token-form input[name=name]", "browser test")
    web.submit("#token-form button[type=submit]")
    token = web.wait_for("#new-token").text
    assert token
    assert web.find("[data-copy=new-token]").is_displayed()
    web.screenshot("tokens")
    request = urllib.request.Request(  # noqa: S310 (loopback)
        browser_gateway.admin_url + "/api/v1/lists", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert response.status == 200
        assert mail_list in [item["name"] for item in json.load(response)["lists"]]
    web.driver.refresh()
    assert web.find_all("#new-token") == []
    assert token not in web.driver.page_source
    assert "browser test" in web.find("#tokens").text
    assert web.console_errors() == []
