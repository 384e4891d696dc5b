"""
Shared fixtures: a test fails when it logged a failure, as under trial.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import LogLevel, globalLogPublisher


@pytest.fixture(autouse=True)
def _fail_on_logged_errors() -> Iterator[None]:
    """
    Observe the global log publisher and fail the test if anything logged a
    failure or an error, including "Unhandled error in Deferred" surfaced by
    a garbage collection at the end of the test.
    """
    errors: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)
        elif event.get("log_level") in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
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
