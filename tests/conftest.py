"""
Shared fixtures: a test fails when it logged a failure, as under trial.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any, cast

import pytest
from hypothesis import settings
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

# Tests do not time things: no property test fails because a loaded machine
# ran one example slowly (hypothesis's default deadline is 200 ms).
settings.register_profile("smtpgw", deadline=None)
settings.load_profile("smtpgw")


@pytest.fixture(autouse=True)
def logged_errors() -> Iterator[list[dict[str, Any]]]:
    """
    Observe the global log publisher and fail the test if anything logged a
    failure or an error, including "Unhandled error in Deferred" surfaced by
    a garbage collection at the end of the test.

    A test that expects an error asks for this fixture by name and removes
    the events it expected from the list it gets.
    """
    errors: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        failed = event.get("log_failure") is not None or event.get("isError")
        if failed or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    try:
        yield errors
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observer))
    if errors:
        from twisted.logger import formatEvent

        texts = []
        for event in errors:
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            texts.append(text)
        pytest.fail("logged errors:\n" + "\n".join(texts))


@pytest.fixture
def web(tmp_path: Any) -> Iterator[Any]:
    """
    The admin web app over a fresh data directory (L{tests.web_support});
    a module may define its own.
    """
    from tests.web_support import make_web_app

    app = make_web_app(tmp_path)
    yield app
    app.close()


@pytest.fixture
def browser(web: Any) -> Any:
    """
    A browser logged in to L{web}.
    """
    return web.logged_in()
