"""
The acceptance benchmark (C{python -m bench.run}) offers the rows it claims:
the in-process and held rows beside the original ones, selected by id
prefix; it configures each server as its row says (the gateway's
C{--acceptors}, its stopped queue, Postfix's HOLD header checks); and its
ratios and CPU split come out right on made-up figures, leaving out what was
not measured. Nothing here starts a server or times anything.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import run
from bench.loadgen import build_message
from bench.run import (
    RATIOS,
    ROWS,
    Settings,
    child_count,
    gateway_args,
    held_fields,
    own_cpu_seconds,
    print_row,
    ratio_lines,
    ratios,
    select,
    split_fields,
)
from bench.servers import (
    HOLD_CHECKS_FILE,
    HOLD_HEADER_CHECKS,
    Gateway,
    Postfix,
    option_value,
)
from bench.tls import CertFiles

#: The rows before the in-process and held ones: their ids must not change.
ORIGINAL_IDS = (
    "sink-single",
    "sink-reuse",
    "source-sink-single",
    "source-sink-reuse",
    "twisted-single",
    "twisted-reuse",
    "twisted-tls-single",
    "postfix-single",
    "postfix-reuse",
    "postfix-tls-single",
    "postfix-tls-handshakes",
    "gateway-single",
    "gateway-reuse",
    "gateway-tls-single",
    "gateway-tls-handshakes",
    "gateway-bind",
)

INPROC_IDS = ("gateway-inproc-single", "gateway-inproc-reuse", "gateway-inproc-tls-single")
GATEWAY_HELD_IDS = ("gateway-held-single", "gateway-held-reuse")
POSTFIX_HELD_IDS = ("postfix-held-single", "postfix-held-reuse")
NEW_IDS = INPROC_IDS + GATEWAY_HELD_IDS + POSTFIX_HELD_IDS


def _settings(**changes: Any) -> Settings:
    values: dict[str, Any] = {
        "sessions": 20,
        "size": 5120,
        "workers": 1,
        "per_session": 100,
        "scale": 1.0,
        "messages": None,
        "time_limit": 120.0,
        "warmup": 500,
        "gateway_args": (),
        "twistd_args": (),
        "postfix_settings": (),
        "twisted_pipelining": False,
        "keep": False,
    }
    values.update(changes)
    return Settings(**values)


def _row(row_id: str) -> run.Row:
    return next(row for row in ROWS if row.id == row_id)


def _ids(only: str) -> list[str]:
    return [row.id for row in select(only)]


def test_list_names_the_new_rows_and_keeps_the_old_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """
    C{--list} prints every row, the original ids unchanged and the
    in-process and held rows added, one per line.
    """
    assert run.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert set(ORIGINAL_IDS) <= set(listed)
    assert set(NEW_IDS) <= set(listed)
    assert listed == [row.id for row in ROWS]
    assert len(set(listed)) == len(listed)


def test_no_row_id_is_the_prefix_of_another() -> None:
    """
    A whole id given to C{--only} selects that row alone.
    """
    for row in ROWS:
        assert _ids(row.id) == [row.id]


@pytest.mark.parametrize(
    ("only", "expected"),
    [
        ("gateway-held", GATEWAY_HELD_IDS),
        ("postfix-held", POSTFIX_HELD_IDS),
        ("gateway-inproc", INPROC_IDS),
        ("gateway-tls", ("gateway-tls-single", "gateway-tls-handshakes")),
        ("postfix-tls", ("postfix-tls-single", "postfix-tls-handshakes")),
        ("gateway-held,postfix-held", POSTFIX_HELD_IDS + GATEWAY_HELD_IDS),
    ],
)
def test_prefix_selects_its_rows_in_table_order(only: str, expected: tuple[str, ...]) -> None:
    """
    An id prefix selects exactly the rows whose id starts with it, in the
    table's order.
    """
    assert _ids(only) == list(expected)


@pytest.mark.parametrize("server", ["gateway", "postfix"])
def test_server_prefix_selects_all_of_its_rows(server: str) -> None:
    """
    C{--only gateway} (or C{postfix}) still selects every row of that server,
    now including its held (and in-process) rows.
    """
    chosen = _ids(server)
    assert chosen == [row.id for row in ROWS if row.server == server]
    assert {row_id for row_id in NEW_IDS if row_id.startswith(server)} <= set(chosen)


def test_unknown_prefix_is_refused() -> None:
    """
    A word that is no row's id or prefix ends the run with the word named.
    """
    with pytest.raises(SystemExit, match="gateway-hold"):
        select("gateway-held,gateway-hold")


def test_new_rows_measure_what_their_counterparts_do() -> None:
    """
    Each in-process row has the load of the gateway row it sits beside, and
    each held row the load of its server's row; only the in-process rows
    set C{--acceptors} and only the held rows hold delivery.
    """
    settings = _settings(scale=0.1)
    pairs = [(f"gateway-inproc-{rest}", f"gateway-{rest}") for rest in ("single", "reuse")]
    pairs += [("gateway-inproc-tls-single", "gateway-tls-single")]
    pairs += [
        (f"{server}-held-{kind}", f"{server}-{kind}")
        for server in ("gateway", "postfix")
        for kind in ("single", "reuse")
    ]
    for new_id, old_id in pairs:
        new, old = _row(new_id), _row(old_id)
        assert (new.server, new.kind, new.starttls) == (old.server, old.kind, old.starttls)
        assert settings.count(new) == settings.count(old)
    for row in ROWS:
        assert (row.acceptors == "0") == (row.id in INPROC_IDS)
        assert row.held == (row.id in GATEWAY_HELD_IDS + POSTFIX_HELD_IDS)


def test_inproc_rows_put_acceptors_0_after_the_gateway_args() -> None:
    """
    The in-process rows add C{--acceptors 0} after any C{--gateway-arg}
    (the last value of an option wins); other gateway rows keep the
    gateway's default or what C{--gateway-arg} says.
    """
    settings = _settings(gateway_args=("--acceptors", "3", "--rate", "500"))
    inproc = gateway_args(_row("gateway-inproc-reuse"), settings)
    assert inproc == ("--acceptors", "3", "--rate", "500", "--acceptors", "0")
    assert option_value(inproc, "--acceptors") == "0"
    assert gateway_args(_row("gateway-reuse"), settings) == settings.gateway_args
    assert gateway_args(_row("gateway-held-reuse"), _settings()) == ()


@pytest.mark.parametrize(
    ("argv", "value"),
    [
        ((), None),
        (("--acceptors", "2"), "2"),
        (("--acceptors=4",), "4"),
        (("--acceptors", "2", "--acceptors=0"), "0"),
        (("--acceptors",), None),
        (("--acceptorsx", "2"), None),
    ],
)
def test_option_value_takes_the_last_value(argv: tuple[str, ...], value: str | None) -> None:
    """
    An option's value is read in both spellings, the last one winning; an
    option with no value after it, or another option's name, gives none.
    """
    assert option_value(argv, "--acceptors") == value


def test_held_rows_get_servers_that_hold() -> None:
    """
    The held rows build a gateway whose queue is stopped and a Postfix that
    holds every message; the other rows build neither.
    """
    settings = _settings(postfix_settings=("in_flow_delay = 0",))
    held_gateway = run._server_for(_row("gateway-held-single"), settings)
    held_postfix = run._server_for(_row("postfix-held-reuse"), settings)
    assert isinstance(held_gateway, Gateway)
    assert held_gateway.hold
    assert isinstance(held_postfix, Postfix)
    assert held_postfix.hold
    assert list(held_postfix.settings) == ["in_flow_delay = 0"]
    plain_gateway = run._server_for(_row("gateway-single"), settings)
    plain_postfix = run._server_for(_row("postfix-single"), settings)
    assert isinstance(plain_gateway, Gateway)
    assert not plain_gateway.hold
    assert isinstance(plain_postfix, Postfix)
    assert not plain_postfix.hold
    inproc = run._server_for(_row("gateway-inproc-tls-single"), settings)
    assert isinstance(inproc, Gateway)
    assert not inproc.hold
    assert option_value(inproc.argv(Path("/d"), "2525"), "--acceptors") == "0"


def _main_cf(config: Path) -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in (config / "main.cf").read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip():
            assert name.strip() not in settings, "main.cf names a setting twice"
            settings[name.strip()] = value.strip()
    return settings


def _tls(tmp_path: Path) -> CertFiles:
    return CertFiles(cert=tmp_path / "cert.pem", key=tmp_path / "key.pem")


def test_postfix_held_config_holds_every_message(tmp_path: Path) -> None:
    """
    With C{hold}, the instance's C{main.cf} points C{header_checks} at a
    regexp table that HOLDs on C{Subject:}, once, before the settings given
    on the command line; the rest of the configuration is the usual one.
    """
    postfix = Postfix(settings=("in_flow_delay = 0",), hold=True)
    config = postfix.write_config(tmp_path, 2525, _tls(tmp_path))
    checks = tmp_path / HOLD_CHECKS_FILE
    settings = _main_cf(config)
    assert settings["header_checks"] == f"regexp:{checks}"
    assert settings["queue_directory"] == str(tmp_path / "queue")
    assert settings["default_transport"] == "discard:benchmark"
    assert settings["in_flow_delay"] == "0"
    text = (config / "main.cf").read_text()
    assert text.index("header_checks") < text.index("in_flow_delay")
    assert checks.read_text() == HOLD_HEADER_CHECKS == "/^Subject:/ HOLD\n"
    assert (config / "master.cf").read_text().startswith("127.0.0.1:2525 inet n - n - - smtpd\n")


def test_postfix_without_hold_has_no_header_checks(tmp_path: Path) -> None:
    """
    The plain Postfix rows are configured as before: no header checks, no
    table written.
    """
    config = Postfix().write_config(tmp_path, 2526, _tls(tmp_path))
    assert "header_checks" not in _main_cf(config)
    assert not (tmp_path / HOLD_CHECKS_FILE).exists()


@pytest.mark.parametrize("row_id", POSTFIX_HELD_IDS)
def test_every_generated_message_matches_the_hold_check(row_id: str) -> None:
    """
    The messages the load generator sends in a held row each have a header
    line that the HOLD pattern matches (Postfix's regexp tables ignore
    case), so none is left out of the hold.
    """
    pattern = re.compile(HOLD_HEADER_CHECKS.split("/")[1], re.IGNORECASE)
    tag = row_id.replace("-", "")
    for seq in (0, 1, 99_999):
        message = build_message(seq, 5120, tag=tag)
        header = message.split(b"\r\n\r\n", 1)[0].decode("ascii").split("\r\n")
        assert [line for line in header if pattern.search(line)] == [
            f"Subject: {tag} message {seq:010d}"
        ]


def test_postfix_held_count_reads_the_hold_queue(tmp_path: Path) -> None:
    """
    A Postfix instance counts the files in its hold queue (hashed
    subdirectories included); before it started it has no count.
    """
    postfix = Postfix(hold=True)
    assert postfix.held_count() is None
    postfix.queue = tmp_path
    assert postfix.held_count() == 0
    (tmp_path / "hold" / "A").mkdir(parents=True)
    for name in ("A/1B2C3", "4D5E6", "7F8A9"):
        (tmp_path / "hold" / name).write_bytes(b"")
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "ABCDE").write_bytes(b"")
    assert postfix.held_count() == 3


def test_held_fields_compare_kept_with_accepted(tmp_path: Path) -> None:
    """
    After a held row the server's kept messages are compared with those it
    accepted, warm-up included.
    """
    postfix = Postfix(hold=True, queue=tmp_path)
    (tmp_path / "hold").mkdir()
    for name in ("A", "B", "C"):
        (tmp_path / "hold" / name).write_bytes(b"")
    fields = held_fields(postfix, {"warmup_accepted": 1, "accepted": 2})
    assert fields == {"held_after_row": 3, "held_expected": 3}
    fields = held_fields(postfix, {"warmup_accepted": 1, "accepted": 3})
    assert fields == {"held_after_row": 3, "held_expected": 4}


def test_gateway_not_running_has_no_held_count() -> None:
    """
    A gateway that never started is not asked (no control socket to ask).
    """
    assert Gateway(hold=True).held_count() is None
    fields = held_fields(Gateway(hold=True), {"warmup_accepted": 0, "accepted": 5})
    assert fields == {"held_after_row": None, "held_expected": 5}


def _figures(row_id: str, rate: float, **more: Any) -> dict[str, Any]:
    row = {
        "id": row_id,
        "status": "ok",
        "rate_per_s": rate,
        "accepted": 100,
        "failed": 0,
        "elapsed_s": 1.0,
        "other_cores": 0.0,
    }
    row.update(more)
    return row


def _all_rows() -> dict[str, dict[str, Any]]:
    return {row.id: _figures(row.id, 100.0 + index) for index, row in enumerate(ROWS)}


def test_issue_ratios_keep_their_targets() -> None:
    """
    The three target ratios are still the issue's: gateway over Postfix,
    one message per connection 2.5x, reused 5x, STARTTLS 1.8x; no extra
    ratio has a target.
    """
    targets = {(r.top, r.bottom): r.target for r in RATIOS if r.target is not None}
    assert targets == {
        ("gateway-single", "postfix-single"): 2.5,
        ("gateway-reuse", "postfix-reuse"): 5.0,
        ("gateway-tls-single", "postfix-tls-single"): 1.8,
    }
    assert all(not r.extra for r in RATIOS if r.target is not None)
    ids = {row.id for row in ROWS}
    assert all(r.top in ids and r.bottom in ids for r in RATIOS)


def test_extra_ratios_held_and_inproc() -> None:
    """
    With every row measured, the held ratios (gateway-held / postfix-held)
    and in-process ratios (gateway-inproc / Postfix) come out, marked
    extra, with no target and no verdict.
    """
    rows = _all_rows()
    rows["gateway-held-single"]["rate_per_s"] = 300.0
    rows["postfix-held-single"]["rate_per_s"] = 120.0
    rows["gateway-inproc-reuse"]["rate_per_s"] = 150.0
    rows["postfix-reuse"]["rate_per_s"] = 100.0
    found = {tuple(ratio["rows"]): ratio for ratio in ratios(rows)}
    held = found[("gateway-held-single", "postfix-held-single")]
    assert (held["ratio"], held["target"], held["met"], held["extra"]) == (2.5, None, None, True)
    inproc = found[("gateway-inproc-reuse", "postfix-reuse")]
    assert (inproc["ratio"], inproc["extra"]) == (1.5, True)
    assert ("gateway-held-reuse", "postfix-held-reuse") in found
    assert ("gateway-inproc-single", "postfix-single") in found
    assert ("gateway-inproc-tls-single", "postfix-tls-single") in found
    assert len(found) == len(RATIOS)
    target = found[("gateway-single", "postfix-single")]
    assert target["extra"] is False
    assert target["met"] is False


def test_ratios_leave_out_missing_skipped_and_empty_rows() -> None:
    """
    A ratio is left out when one of its rows was not selected, was skipped
    or errored (no rate), or accepted nothing; the others still come out.
    """
    rows = _all_rows()
    del rows["postfix-held-reuse"]
    rows["postfix-held-single"] = {
        "id": "postfix-held-single",
        "status": "skipped",
        "reason": "postfix not available: a throwaway Postfix instance needs root",
    }
    rows["gateway-inproc-tls-single"] = {
        "id": "gateway-inproc-tls-single",
        "status": "error",
        "reason": "gateway did not start",
    }
    rows["gateway-inproc-single"]["rate_per_s"] = 0.0
    found = {tuple(ratio["rows"]) for ratio in ratios(rows)}
    for gone in (
        ("gateway-held-single", "postfix-held-single"),
        ("gateway-held-reuse", "postfix-held-reuse"),
        ("gateway-inproc-tls-single", "postfix-tls-single"),
        ("gateway-inproc-single", "postfix-single"),
        ("gateway-single", "gateway-inproc-single"),
    ):
        assert gone not in found
    assert ("gateway-inproc-reuse", "postfix-reuse") in found
    assert ("gateway-single", "postfix-single") in found
    assert ratios({}) == []


def test_ratio_lines_give_verdicts_only_with_targets() -> None:
    """
    A target ratio is printed with its verdict, an extra one with none; a
    noisy row is named.
    """
    rows = _all_rows()
    rows["gateway-single"]["rate_per_s"] = 300.0
    rows["postfix-single"]["rate_per_s"] = 100.0
    rows["postfix-held-single"]["other_cores"] = 0.5
    lines = ratio_lines(ratios(rows))
    by_label = {line.split("  ")[1].strip(): line for line in lines}
    target = by_label["durable + AUTH, 1 msg/conn: gateway / Postfix"]
    assert "3.00x" in target
    assert "target >= 2.5x: MET" in target
    held = by_label["both held, 1 msg/conn: gateway-held / postfix-held"]
    assert "target" not in held
    assert "(noisy: postfix-held-single)" in held


def test_split_fields_divide_the_tree_between_main_and_children() -> None:
    """
    The gateway's CPU is split into its main process and the rest of its
    tree (its acceptors), each also per message; a tree that read lower
    than the main process gives the children nothing rather than less.
    """
    fields = split_fields(main=0.5, tree=2.0, units=1000, processes=2)
    assert fields == {
        "main_cpu_s": 0.5,
        "children_cpu_s": 1.5,
        "main_us_per_unit": 500.0,
        "children_us_per_unit": 1500.0,
        "child_processes": 2,
    }
    assert split_fields(main=1.0, tree=0.99, units=0, processes=0) == {
        "main_cpu_s": 1.0,
        "children_cpu_s": 0.0,
        "main_us_per_unit": None,
        "children_us_per_unit": None,
        "child_processes": 0,
    }


def test_own_cpu_and_children_from_proc() -> None:
    """
    A process's own CPU is read from C{/proc} (none for a process that is
    gone), and its live children are counted.
    """
    assert own_cpu_seconds(os.getpid()) >= 0.0
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait()
    assert own_cpu_seconds(gone.pid) == 0.0
    before = child_count(os.getpid())
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    ) as child:
        assert child_count(os.getpid()) == before + 1
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert child_count(os.getpid()) == before


def test_row_line_shows_main_process_cpu_and_held_warning() -> None:
    """
    A gateway row prints its main process's CPU per message; a row without
    the split prints a dash; a held row that kept fewer messages than it
    accepted is warned about, one that kept them all is not.
    """
    lines: list[str] = []
    gateway = _figures("gateway-held-single", 1234.0, server_us_per_unit=900.0)
    gateway.update(main_us_per_unit=280.0, held_after_row=1500, held_expected=1500)
    print_row(gateway, lines.append)
    postfix = _figures("postfix-held-single", 900.0, server_us_per_unit=1100.0)
    postfix.update(held_after_row=1499, held_expected=1500)
    print_row(postfix, lines.append)
    assert len(lines) == 3
    # The columns end "srv us", "main us", "lg us".
    assert run.TABLE_HEADER.split()[-6:] == ["srv", "us", "main", "us", "lg", "us"]
    assert lines[0].split()[-3:-1] == ["900", "280"]
    assert lines[1].split()[-3:-1] == ["1,100", "-"]
    assert "WARNING" in lines[2]
    assert "holds 1,499 of 1,500 accepted" in lines[2]


def test_sigterm_ends_the_run_through_its_cleanup() -> None:
    """
    With the run's handler, SIGTERM raises SystemExit (status 143) where
    the run is, so the finally blocks stop the row's server; the previous
    handler is given back.
    """
    import signal

    cleaned: list[bool] = []

    def a_row() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            # The handler runs before this returns (or while it waits).
            signal.pause()
        finally:
            cleaned.append(True)

    previous = run.exit_on_sigterm()
    try:
        with pytest.raises(SystemExit) as stopped:
            a_row()
        assert stopped.value.code == 143
        assert cleaned == [True]
    finally:
        signal.signal(signal.SIGTERM, previous)
