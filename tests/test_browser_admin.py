"""
The admin pages in a real headless Chromium against the real gateway
(C{twistd -n smtpgw --admin ...}): logging in and out, and the screenshots
of the main pages (saved as test artifacts, see L{tests.browser_support}).

The tests of one module share one gateway and one browser, so the whole
module stays a few seconds long.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser_support import (
    ADMIN_NAME,
    AdminBrowser,
    admin_browser_fixture,  # noqa: F401 (a fixture)
    artifacts_dir,
    browser_gateway_fixture,  # noqa: F401 (a fixture)
    driver_fixture,  # noqa: F401 (a fixture)
    need_browser,
    screenshots_fixture,  # noqa: F401 (a fixture)
)

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
