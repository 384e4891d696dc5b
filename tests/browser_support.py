"""
Drive the admin pages in a real headless Chromium against the real gateway.

Debian's C{/usr/bin/chromium} is driven by Selenium 4 through Debian's
C{/usr/bin/chromedriver}: both paths are given explicitly, so
selenium-manager never looks anything up or downloads a browser.

Without the browser, its driver or Selenium, a browser test is skipped on a
developer machine with the reason, and fails when C{CI=true}: CI must never
pass by skipping.

Screenshots go to C{$SMTPGW_ARTIFACTS} when it is set, else to
C{<repo>/test-artifacts/screenshots/} (not tracked by git).

The fixtures here (C{driver}, C{browser_gateway}, C{screenshots},
C{admin_browser}) are imported by the browser test modules, under the names
of their functions (C{..._fixture}); pytest knows them by their fixture
names.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest
from attrs import define, field

from tests.gateway_process import Gateway, free_port

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

__all__ = [
    "ADMIN_NAME",
    "CHROMEDRIVER",
    "CHROMIUM",
    "WAIT_SECONDS",
    "WINDOW",
    "AdminBrowser",
    "admin_browser_fixture",
    "artifacts_dir",
    "browser_gateway_fixture",
    "driver_fixture",
    "missing_browser",
    "need_browser",
    "screenshots_fixture",
    "smtp_auth_plain",
    "start_driver",
]

CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMEDRIVER: Final = Path("/usr/bin/chromedriver")
#: A fixed size, so screenshots and layouts are the same on every run.
WINDOW: Final = (1280, 900)
#: How long a page may take to show what a test waits for.
WAIT_SECONDS: Final = 10.0
#: The admin account the first start of the gateway makes.
ADMIN_NAME: Final = "admin"
#: Console entries from the network report each answer that is not a 2xx
#: (a refused login is a 401 on purpose, a missing favicon a 404); the
#: other sources (security: the content security policy's refusals;
#: javascript) are what a page got wrong.
_NETWORK_SOURCE: Final = "network"


def missing_browser(chromium: Path = CHROMIUM, chromedriver: Path = CHROMEDRIVER) -> str | None:
    """
    Why the browser tests cannot run here, or L{None} when they can.
    """
    if not os.access(chromium, os.X_OK):
        return f"{chromium} is missing (Debian package chromium)"
    if not os.access(chromedriver, os.X_OK):
        return f"{chromedriver} is missing (Debian package chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "the Python package selenium is not installed"
    return None


def need_browser(
    chromium: Path = CHROMIUM,
    chromedriver: Path = CHROMEDRIVER,
    environ: dict[str, str] | None = None,
) -> None:
    """
    Skip the calling test when the browser cannot run, except under
    C{CI=true}, where it fails instead.
    """
    reason = missing_browser(chromium, chromedriver)
    if reason is None:
        return
    env = os.environ if environ is None else environ
    if env.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}: the browser tests must run in CI", pytrace=False)
    pytest.skip(f"browser tests need Chromium, chromedriver and selenium: {reason}")


def artifacts_dir(environ: dict[str, str] | None = None) -> Path:
    """
    Where screenshots are saved (made when missing).
    """
    env = os.environ if environ is None else environ
    configured = env.get("SMTPGW_ARTIFACTS")
    if configured:
        directory = Path(configured)
    else:
        directory = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def start_driver(*, javascript: bool = True) -> WebDriver:
    """
    A headless Chromium with a fixed window, its console log kept.

    @param javascript: whether pages may run scripts; without, the pages
        are seen as by a visitor who turned them off.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.add_argument("--headless=new")
    # Chromium's sandbox cannot start as root (CI containers); as any other
    # user it stays on.
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")
    options.add_argument("--disable-dev-shm-usage")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.add_argument("--lang=en-US")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    service = Service(executable_path=str(CHROMEDRIVER))
    browser = webdriver.Chrome(service=service, options=options)
    browser.set_page_load_timeout(30)
    return browser


#: What chromedriver sometimes answers, instead of "stale element", about an
#: element of a page the browser has left (SeleniumHQ/selenium#15401).
_LEFT_PAGE: Final = ("does not belong to the document", "No node with given id")


def _is_stale(element: WebElement) -> bool:
    """
    Whether the page that held C{element} is gone (Selenium's own
    C{staleness_of} lets chromedriver's other answers for it escape).
    """
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )

    try:
        element.is_enabled()
    except (StaleElementReferenceException, NoSuchElementException):
        return True
    except WebDriverException as e:
        if any(text in str(e.msg) for text in _LEFT_PAGE):
            return True
        raise
    return False


@define
class AdminBrowser:
    """
    A browser on the admin app of one gateway, with the steps the tests
    repeat: opening a page, logging in and out, waiting, screenshots.
    """

    driver: WebDriver
    base_url: str
    password: str = field(repr=False)
    shots: Path
    saved: list[Path] = field(factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path

    def path(self) -> str:
        """
        The path (and query) of the page shown now.
        """
        current: str = self.driver.current_url
        assert current.startswith(self.base_url), current
        return current[len(self.base_url) :] or "/"

    def open(self, path: str) -> None:
        self.driver.get(self.url(path))

    def wait(self, condition: Callable[[Any], Any], what: str) -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, WAIT_SECONDS).until(
            condition, f"waited {WAIT_SECONDS} s for {what} on {self.driver.current_url}"
        )

    def find(self, css: str) -> WebElement:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        from selenium.webdriver.common.by import By

        found: list[WebElement] = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found

    def wait_for(self, css: str) -> WebElement:
        """
        Wait until an element is on the page and return it.
        """
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        element: WebElement = self.wait(
            ec.presence_of_element_located((By.CSS_SELECTOR, css)), css
        )
        return element

    def click_and_load(self, css: str) -> None:
        """
        Click an element that leads to another page and wait for it.
        """
        element = self.find(css)
        element.click()
        self.wait(lambda _: _is_stale(element), f"the page after clicking {css}")
        # The old page is gone the moment the new one starts: wait until the
        # new one is all there.
        self.wait(
            lambda driver: driver.execute_script("return document.readyState") == "complete",
            f"the page after clicking {css} to load",
        )

    def submit(self, button_css: str) -> None:
        """
        Submit a form with its button and wait for the next page.
        """
        self.click_and_load(button_css)

    def fill(self, css: str, value: str) -> None:
        element = self.find(css)
        element.clear()
        element.send_keys(value)

    def choose(self, css: str, value: str) -> None:
        """
        Pick the option of a C{<select>} by its value.
        """
        from selenium.webdriver.support.ui import Select

        Select(self.find(css)).select_by_value(value)

    def field_error(self, name: str) -> WebElement | None:
        """
        The error shown beside the form control named C{name}: the element
        C{#error-<name>} in the same C{.field} as the control, if any.
        """
        found = self.find_all(f"div.field:has([name='{name}']) #error-{name}")
        return found[0] if found else None

    def rows(self, table_css: str) -> list[list[str]]:
        """
        The text of each cell of each row of a table's body.
        """
        from selenium.webdriver.common.by import By

        return [
            [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in self.find_all(f"{table_css} tbody tr")
        ]

    def heading(self) -> str:
        text: str = self.find("main h1").text
        return text

    def logged_in(self) -> bool:
        return bool(self.find_all("header.top .account form[action='/logout']"))

    def login(self, name: str = ADMIN_NAME, password: str | None = None) -> None:
        """
        Log in through the login form (and land on the page it leads to).
        """
        self.open("/login")
        self.fill("input[name=name]", name)
        self.fill("input[name=password]", self.password if password is None else password)
        self.submit("form[action='/login'] button[type=submit]")

    def ensure_logged_in(self) -> None:
        self.open("/")
        if self.path().startswith("/login"):
            self.login()
        assert self.logged_in(), f"not logged in on {self.path()}: {self.heading()!r}"

    def logout(self) -> None:
        self.submit("header.top .account form[action='/logout'] button")

    def console_errors(self) -> list[str]:
        """
        The errors the pages logged since the last call (the content
        security policy's refusals and script errors), less the network's
        reports of status codes.
        """
        entries = self.driver.get_log("browser")
        return [
            str(entry["message"])
            for entry in entries
            if entry["level"] == "SEVERE" and entry.get("source") != _NETWORK_SOURCE
        ]

    def screenshot(self, name: str) -> Path:
        """
        Save the whole page (not only the window) as C{<name>.png}.
        """
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        self.saved.append(path)
        return path


def smtp_auth_plain(gateway: Gateway, username: str, password: str) -> int:
    """
    Authenticate with C{AUTH PLAIN} after STARTTLS on the gateway's SMTP
    port, as an integration would with the credentials the pages showed.

    @return: the reply's code: 235 when accepted, 535 when refused.
    """
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        client.ehlo("browser.test")
        client.starttls(context=gateway.tls_context())
        client.ehlo("browser.test")
        # smtplib's auth_plain reads the credentials from these attributes.
        client.user, client.password = username, password
        try:
            code, _ = client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code
        return code


@pytest.fixture(scope="module", name="screenshots")
def screenshots_fixture() -> Path:
    """
    The directory the screenshots of this run go to.
    """
    return artifacts_dir()


@pytest.fixture(scope="module", name="browser_gateway")
def browser_gateway_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """
    The real gateway with its admin app, for one test module.
    """
    need_browser()
    data = tmp_path_factory.mktemp("browser") / "data"
    # A wrong SMTP password is part of the flows; the tarpit has its own tests.
    gateway = Gateway(
        data,
        free_port(),
        extra_args=("--auth-failure-delay", "0.05"),
        admin_port=free_port(),
    )
    gateway.start()
    try:
        gateway.wait_admin()
        yield gateway
    finally:
        if gateway.process is not None:
            assert gateway.stop(), gateway.log_tail()


@pytest.fixture(scope="module", name="driver")
def driver_fixture() -> Iterator[WebDriver]:
    """
    One headless Chromium for one test module.
    """
    need_browser()
    browser = start_driver()
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module", name="admin_browser")
def admin_browser_fixture(
    driver: WebDriver, browser_gateway: Gateway, screenshots: Path
) -> AdminBrowser:
    """
    The browser on the gateway's admin app, knowing the first admin's
    password (read from the gateway's log).
    """
    return AdminBrowser(
        driver, browser_gateway.admin_url, browser_gateway.first_admin_password(), screenshots
    )
