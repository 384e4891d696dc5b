"""
Tests for the C{smtpgw-admin recipients} and C{campaign} commands, run
in-process through C{main()}: imports with per-line errors (nothing
imported unless C{--valid-only}), listings, console sends created,
shown, paused, resumed and cancelled in the database, C{--json}, and
one-line errors that change nothing.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from smtpgw.admin_cli import main
from smtpgw.campaigns import MAX_BODY_LENGTH, SQLiteCampaignStore
from smtpgw.database import database_path
from smtpgw.recipients import MAX_PAGE
from smtpgw.userstore import SQLiteUserStore

T0 = 1_700_000_000.0


class Admin:
    """
    Runs C{smtpgw-admin} in-process on one data directory.
    """

    def __init__(self, data_dir: Path, capsys: pytest.CaptureFixture[str], clock: Clock) -> None:
        self.data_dir = data_dir
        self.capsys = capsys
        self.clock = clock

    def __call__(self, *args: str) -> tuple[int, str, str]:
        """
        @return: exit status, standard output, standard error.
        """
        self.capsys.readouterr()
        status = main(["--data-dir", str(self.data_dir), *args], clock=self.clock)
        out, err = self.capsys.readouterr()
        if status:
            assert out == ""
            assert err.startswith("smtpgw-admin: error: ")
            assert err.count("\n") == 1, "the error is not one line"
        return status, out, err

    def json(self, *args: str) -> Any:
        status, out, err = self(*args, "--json")
        assert status == 0, err
        return json.loads(out)


@pytest.fixture
def admin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Admin:
    clock = Clock()
    clock.advance(T0)
    with SQLiteUserStore.open(database_path(tmp_path), clock, rounds=4) as users:
        users.create_list("news")
        users.create_user("news", domains="example.com")
    return Admin(tmp_path, capsys, clock)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_import_reports_and_lists(admin: Admin, tmp_path: Path) -> None:
    """
    A clean file is imported and reported; the list shows the recipients
    and the counts by status.
    """
    csv = write(tmp_path, "r.csv", "email,name\na@x.org,Ann\nb@x.org,Bob\n")
    document = admin.json("recipients", "import", "--list", "news", csv)
    assert document == {"imported": 2, "added": 2, "updated": 0, "applied": True, "errors": []}
    status, out, _ = admin("recipients", "import", "--list", "news", csv)
    assert status == 0
    assert "imported 2 recipient(s) into list news: 0 added, 2 updated" in out
    listing = admin.json("recipients", "list", "--list", "news")
    assert [r["email"] for r in listing["recipients"]] == ["a@x.org", "b@x.org"]
    assert listing["recipients"][0]["fields"] == {"name": "Ann"}
    assert listing["counts"] == {"subscribed": 2, "unsubscribed": 0, "bounced": 0}
    assert listing["next_after"] is None
    status, out, _ = admin("recipients", "list", "--list", "news", "--limit", "1")
    assert "more: list on with --after" in out


def test_import_with_bad_rows_changes_nothing_unless_valid_only(
    admin: Admin, tmp_path: Path
) -> None:
    """
    Bad rows make the import fail on one line naming them, with nothing
    imported; with --valid-only the good rows go in and the bad ones are
    reported.
    """
    csv = write(tmp_path, "r.csv", "email\na@x.org\nnope\na@x.org\n")
    status, _, err = admin("recipients", "import", "--list", "news", csv)
    assert status == 2
    assert "2 bad row(s), nothing imported (--valid-only imports the 1 good one(s))" in err
    assert "line 3: invalid address 'nope'" in err
    assert "line 4: duplicate address a@x.org (first on line 2)" in err
    assert admin.json("recipients", "list", "--list", "news")["recipients"] == []
    document = admin.json("recipients", "import", "--list", "news", csv, "--valid-only")
    assert document["imported"] == 1
    assert [e["line"] for e in document["errors"]] == [3, 4]


def test_valid_only_skips_a_row_with_bad_quoting(admin: Admin, tmp_path: Path) -> None:
    """
    A row the CSV reader refuses (text after a closing quote) is a bad row
    like any other: named by its line, and skipped with --valid-only.
    """
    csv = write(tmp_path, "r.csv", 'email,name\na@x.org,"Ann" Smith\nb@x.org,Bob\n')
    status, _, err = admin("recipients", "import", "--list", "news", csv)
    assert status == 2
    assert "1 bad row(s), nothing imported" in err
    assert "line 2: not readable as CSV" in err
    document = admin.json("recipients", "import", "--list", "news", csv, "--valid-only")
    assert (document["imported"], [e["line"] for e in document["errors"]]) == (1, [2])
    listed = admin.json("recipients", "list", "--list", "news")["recipients"]
    assert [r["email"] for r in listed] == ["b@x.org"]


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("recipients", "import", "--list", "nope", "GOOD"), 1, "no list named 'nope'"),
        (("recipients", "import", "--list", "news", "/nonexistent.csv"), 1, "cannot read"),
        (("recipients", "import", "--list", "news", "NOHEADER"), 2, "no 'email' column"),
        (("recipients", "list", "--list", "news", "--limit", str(MAX_PAGE + 1)), 2, "--limit"),
        (("recipients", "list", "--list", "news", "--status", "gone"), 2, "--status"),
    ],
)
def test_recipient_command_errors(
    admin: Admin, tmp_path: Path, args: tuple[str, ...], status: int, message: str
) -> None:
    """
    Unknown lists, unreadable or refused files and bad options fail on one
    line with the right status.
    """
    files = {
        "GOOD": write(tmp_path, "good.csv", "email\na@x.org\n"),
        "NOHEADER": write(tmp_path, "bad.csv", "a@x.org\n"),
    }
    got, _, err = admin(*(files.get(a, a) for a in args))
    assert got == status
    assert message in err


def test_campaign_add_show_list_pause_resume_cancel(admin: Admin, tmp_path: Path) -> None:
    """
    A send is created (bodies from options or files), shown and listed;
    pause, resume and cancel change its state in the database.
    """
    html = write(tmp_path, "body.html", "<p>Hi {{name}}</p>")
    created = admin.json(
        "campaign",
        "add",
        "--list",
        "news",
        "--subject",
        "Hello {{name}}",
        "--text",
        "Hi {{name}}",
        "--html-file",
        html,
        "--sender",
        "news@example.com",
        "--priority",
        "2",
        "--send-at",
        "2030-01-31T09:00:00Z",
    )
    assert created["state"] == "scheduled"
    assert (created["priority"], created["send_at"]) == (2, "2030-01-31T09:00:00Z")
    assert created["html"] == "<p>Hi {{name}}</p>"
    number = str(created["id"])
    assert admin.json("campaign", "show", number) == created
    assert [c["id"] for c in admin.json("campaign", "list")["campaigns"]] == [created["id"]]
    assert admin.json("campaign", "list", "--state", "finished")["campaigns"] == []
    paused = admin.json("campaign", "pause", number)
    assert (paused["state"], paused["paused_reason"]) == ("paused", "paused by an admin")
    status, out, _ = admin("campaign", "list")
    assert "paused (paused by an admin)" in out
    assert admin.json("campaign", "resume", number)["state"] == "scheduled"
    assert admin.json("campaign", "cancel", number)["state"] == "cancelled"
    status, _, err = admin("campaign", "resume", number)
    assert status == 1
    assert "it is cancelled" in err
    status, out, _ = admin("campaign", "show", number)
    assert "state: cancelled" in out


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("--subject", ""), 2, "--subject: a subject is required"),
        (("--sender", "x@other.org"), 2, "--sender: x@other.org may not send for list news"),
        (("--priority", "9"), 2, "--priority"),
        (("--send-at", "soon"), 2, "--send-at"),
        (("--send-at", "9999-12-31T23:59:59-23:59"), 2, "later than 9999-12-31T23:59:59Z"),
        (("--send-at", "9999-12-31T23:59:59-00:01"), 2, "--send-at"),
        (("--list", "nope"), 1, "no list named 'nope'"),
        (("--no-body",), 2, "--text: a text or an HTML body"),
    ],
)
def test_campaign_add_refuses_bad_input(
    admin: Admin, args: tuple[str, ...], status: int, message: str
) -> None:
    """
    Bad fields fail on one line naming the option, and nothing is created.
    """
    options = {
        "--list": "news",
        "--subject": "S",
        "--sender": "news@example.com",
        "--text": "T",
    }
    extra: list[str] = []
    if args == ("--no-body",):
        del options["--text"]
    else:
        for key, value in zip(args[::2], args[1::2], strict=True):
            if key in options:
                options[key] = value
            else:
                extra += [key, value]
    flat = [item for pair in options.items() for item in pair] + extra
    got, _, err = admin("campaign", "add", *flat)
    assert got == status
    assert message in err
    with SQLiteCampaignStore.open(database_path(admin.data_dir), admin.clock) as store:
        assert store.campaigns() == []


def test_send_at_is_taken_at_the_last_second_of_9999(admin: Admin) -> None:
    """
    C{--send-at} at the last second of the year 9999 in UTC is taken and
    shown (one second past is refused, above).
    """
    created = admin.json(
        "campaign", "add", "--list", "news", "--subject", "S", "--sender",
        "news@example.com", "--text", "T", "--send-at", "9999-12-31T23:59:59Z",
    )  # fmt: skip
    assert created["send_at"] == "9999-12-31T23:59:59Z"
    status, out, _ = admin("campaign", "show", str(created["id"]))
    assert (status, "send_at: 9999-12-31T23:59:59Z" in out) == (0, True)


ADD = ("campaign", "add", "--list", "news", "--subject", "S", "--sender", "news@example.com")


@pytest.mark.parametrize(("option", "character"), [("--text-file", "€"), ("--html-file", "😀")])
def test_a_body_file_is_taken_whole_at_the_limit_and_refused_one_past(
    admin: Admin, tmp_path: Path, option: str, character: str
) -> None:
    """
    A body file of L{MAX_BODY_LENGTH} characters (of 3 or 4 bytes each,
    with a byte order mark) is taken whole; one character more, or far
    more, fails on one line and creates nothing (it is never cut short).
    """
    at = tmp_path / "at.txt"
    at.write_bytes(codecs.BOM_UTF8 + (character * MAX_BODY_LENGTH).encode("utf-8"))
    created = admin.json(*ADD, option, str(at))
    body = created["text" if option == "--text-file" else "html"]
    assert body == character * MAX_BODY_LENGTH
    for size in (MAX_BODY_LENGTH + 1, 2 * MAX_BODY_LENGTH):
        past = tmp_path / "past.txt"
        past.write_text(character * size, encoding="utf-8")
        status, _, err = admin(*ADD, option, str(past))
        assert status == 2
        assert f"{option}: {past} is longer than the {MAX_BODY_LENGTH} characters" in err
    with SQLiteCampaignStore.open(database_path(admin.data_dir), admin.clock) as store:
        assert [c.id for c in store.campaigns()] == [created["id"]]


@pytest.mark.parametrize("option", ["--subject", "--text", "--html", "--sender", "--list"])
def test_arguments_that_are_not_utf8_fail_on_one_line(admin: Admin, option: str) -> None:
    """
    Bytes that are not UTF-8 on the command line (lone surrogates in
    argv) are refused naming the option, not a traceback; nothing is
    created.
    """
    values = {"--list": "news", "--subject": "S", "--sender": "news@example.com", "--text": "T"}
    values[option] = "news\udcff" if option != "--sender" else "n\udcff@example.com"
    flat = [item for pair in values.items() for item in pair]
    status, _, err = admin("campaign", "add", *flat)
    assert status == 2
    assert f"{option}: not valid UTF-8 text" in err
    with SQLiteCampaignStore.open(database_path(admin.data_dir), admin.clock) as store:
        assert store.campaigns() == []


def test_campaign_commands_on_unknown_sends(admin: Admin) -> None:
    """
    Showing or changing a send that does not exist fails with exit 1.
    """
    for verb in ("show", "pause", "resume", "cancel"):
        status, _, err = admin("campaign", verb, "42")
        assert status == 1
        assert "no console send 42" in err
