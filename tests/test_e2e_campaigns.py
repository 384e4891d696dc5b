"""
End-to-end: a console send to 5,000 recipients through the real gateway
(C{twistd smtpgw}), relaying at C{--rate 200} to a real SMTP server in
another process (L{tests.relay_target_main}), with a burst of priority-1
SMTP+ mail in the middle (issue 5, "How it must be shown").

What "before any further console message" means here
=====================================================

The target writes each message to its log as it takes the final dot, so
the log is the order of delivery. A console message is I{dispatched} (handed
to the relay) by the queue; the queue closes the send's gate while the
priority-1 message is scheduled, before the client is answered C{250}. So
no console message is dispatched after the first C{250} until the last
priority-1 message is done and the grace period (C{--preemption-grace})
has passed. Console messages that were being delivered at that instant
may still land after it, between priority-1 messages: there are at most
C{--concurrency} of them, and since a send's messages are dispatched in
recipient order, they are among the C{--concurrency} lowest recipients the
target had not received yet. The test records the log's size when the
first C{250} comes and checks both of every console message between that
point and the last priority-1 message (the target cannot tell a message in
flight from one dispatched late among those lowest few, so the count is
the bound); and that the next console message comes at least the grace
period after the last priority-1 one.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import smtplib
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field, frozen

from tests.gateway_process import (
    Credentials,
    Gateway,
    RelayTargetProcess,
    admin,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.e2e

RECIPIENTS = 5000
RATE = 200
CONCURRENCY = 10
GRACE = 1.0
URGENT = 20
#: Console messages the target has taken before the priority-1 burst.
BURST_AFTER = 1000
CONSOLE_SENDER = "news@example.com"
URGENT_SENDER = "alerts@example.com"
PAUSED_REASON = "priority-1 SMTP+ traffic"
_RECIPIENT = re.compile(r"r(\d{5})@dest\.test")


def wall() -> float:
    """
    The wall clock, in seconds since the epoch: the target logs its times
    on it (same machine), so the test's moments compare with them.
    """
    return datetime.now(UTC).timestamp()


@frozen
class Taken:
    """
    One message in the target's log.

    @ivar offset: where its line starts in the log file.
    @ivar received_at: the target's wall clock at the final dot.
    """

    offset: int
    sender: str
    recipient: str
    received_at: float

    @property
    def console(self) -> bool:
        return self.sender == CONSOLE_SENDER

    @property
    def recipient_number(self) -> int:
        match = _RECIPIENT.fullmatch(self.recipient)
        assert match is not None, self.recipient
        return int(match.group(1))


@define
class TargetLog:
    """
    The target's log (C{relayed.jsonl}), read on as it grows: only whole
    lines, so a line being written is read next time.
    """

    path: Path
    taken: list[Taken] = field(factory=list)
    _read_to: int = 0

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def refresh(self) -> list[Taken]:
        if not self.path.exists():
            return self.taken
        with self.path.open("rb") as f:
            f.seek(self._read_to)
            data = f.read()
        end = data.rfind(b"\n") + 1
        at = self._read_to
        for line in data[:end].splitlines(keepends=True):
            entry = json.loads(line)
            if entry.get("retract"):
                self.taken.pop()
            else:
                self.taken.append(
                    Taken(at, entry["sender"], entry["recipients"][0], entry["received_at"])
                )
            at += len(line)
        self._read_to += end
        return self.taken

    def console_count(self) -> int:
        return sum(1 for t in self.refresh() if t.console)


@frozen
class Sample:
    """
    The send as the API showed it at one moment (L{wall}, when the answer
    came).
    """

    at: float
    state: str
    reason: str | None
    sent: int


@define
class Send:
    """
    A gateway relaying to a target, with a console send to RECIPIENTS
    recipients under way.
    """

    gw: Gateway
    target: RelayTargetProcess
    log: TargetLog
    campaign_id: int
    token: str
    urgent: Credentials
    addresses: set[str]

    def show(self) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 (http on loopback)
            f"{self.gw.admin_url}/api/v1/campaigns/{self.campaign_id}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            document: dict[str, Any] = json.loads(response.read())
            return document

    def wait_console(self, count: int, timeout: float = 60.0) -> None:
        wait_until(lambda: self.log.console_count() >= count, timeout, f"{count} console messages")


@pytest.fixture
def send(tmp_path: Path) -> Iterator[Send]:
    """
    Start the target and the gateway, make the lists, import RECIPIENTS
    recipients from a CSV file with C{smtpgw-admin} and create the send.
    """
    target = RelayTargetProcess(tmp_path)
    target.start()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    gw = Gateway(
        data_dir,
        free_port(),
        relay=f"smtp://127.0.0.1:{target.port}",
        admin_port=free_port(),
        extra_args=(
            "--rate",
            str(RATE),
            "--concurrency",
            str(CONCURRENCY),
            "--preemption-grace",
            str(GRACE),
        ),
    )
    try:
        # The first command makes the database; the others run while the
        # gateway starts (a few seconds each on a loaded machine).
        admin(data_dir, "list", "add", "news")
        failed: list[BaseException] = []

        def start() -> None:
            try:
                gw.start()
                gw.wait_admin()
            except BaseException as e:
                failed.append(e)

        starting = threading.Thread(target=start, daemon=True)
        starting.start()
        admin(data_dir, "user", "add", "--list", "news", "--domains", "example.com")
        admin(data_dir, "list", "add", "ops")
        made = admin(
            data_dir, "user", "add", "--list", "ops", "--domains", "example.com", "--priority", "1"
        )
        urgent = Credentials(made["username"], made["password"])
        addresses = {f"r{n:05d}@dest.test" for n in range(1, RECIPIENTS + 1)}
        csv = tmp_path / "recipients.csv"
        csv.write_text(
            "email,name\n"
            + "".join(f"r{n:05d}@dest.test,Reader {n}\n" for n in range(1, RECIPIENTS + 1))
        )
        imported = admin(data_dir, "recipients", "import", "--list", "news", str(csv))
        assert imported["imported"] == RECIPIENTS, imported
        token = admin(data_dir, "token", "add", "e2e")["token"]
        starting.join(60)
        if failed:
            raise failed[0]
        assert gw.process is not None, "the gateway did not start"
        campaign = admin(
            data_dir,
            "campaign",
            "add",
            "--list",
            "news",
            "--subject",
            "News for {{name}}",
            "--sender",
            CONSOLE_SENDER,
            "--text",
            "Hello {{name}},\n\nthe news of the week.\n",
        )
        assert campaign["priority"] == 3
        yield Send(
            gw,
            target,
            TargetLog(target.output),
            campaign["id"],
            token,
            urgent,
            addresses,
        )
    finally:
        if gw.process is not None:
            gw.kill9()
        target.stop()


class Poller(threading.Thread):
    """
    Reads the send from the API every 20 ms until stopped.
    """

    def __init__(self, send: Send) -> None:
        super().__init__(daemon=True)
        self.send = send
        self.samples: list[Sample] = []
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                document = self.send.show()
            except OSError as e:
                self.errors.append(str(e))
            else:
                self.samples.append(
                    Sample(
                        wall(),
                        document["state"],
                        document["paused_reason"],
                        document["sent"],
                    )
                )
            self.stopping.wait(0.02)

    def seen(self, predicate: Callable[[Sample], bool]) -> bool:
        return any(predicate(s) for s in list(self.samples))

    def resumed(self, since: float) -> bool:
        """
        Whether the send was shown paused, then not, after C{since}.
        """
        samples = list(self.samples)
        paused = [s.at for s in samples if s.state == "paused"]
        return bool(paused) and any(
            s.at > max(since, paused[0]) and s.state != "paused" for s in samples
        )


@define
class Burst:
    """
    What the client and the observers saw of the priority-1 burst.

    @ivar started: when the client sent the first message's MAIL (times
        are L{wall}).
    @ivar mark: the target log's size when the first C{250} came.
    @ivar first_250: when it came; likewise C{last_250}.
    @ivar samples: the API's answers, from before the first message on.
    @ivar cli: C{smtpgw-admin campaign show}, run once the API showed the
        pause: its document, and when it started and ended.
    """

    started: float
    mark: int
    first_250: float
    last_250: float
    samples: list[Sample]
    cli: tuple[dict[str, Any], float, float]


def send_urgent(send: Send, tag: str) -> Burst:
    """
    Send URGENT priority-1 messages over one authenticated SMTP connection,
    one after another, while the API is polled; return once the API shows
    the send going on again.
    """
    poller = Poller(send)
    client = smtplib.SMTP("127.0.0.1", send.gw.port, timeout=30)
    try:
        client.login(send.urgent.username, send.urgent.password)
        poller.start()
        wait_until(lambda: len(poller.samples) >= 2, 10, "the API poller")
        cli: list[tuple[dict[str, Any], float, float]] = []

        def show_with_cli() -> None:
            # Once the API shows the pause: the CLI reads the same row.
            wait_until(lambda: poller.seen(lambda s: s.state == "paused"), 10, "the pause")
            started = wall()
            document = admin(send.gw.data_dir, "campaign", "show", str(send.campaign_id))
            cli.append((document, started, wall()))

        cli_thread = threading.Thread(target=show_with_cli, daemon=True)
        mark = first_250 = 0.0
        started = wall()
        for n in range(URGENT):
            code, reply = client.mail(URGENT_SENDER)
            assert code == 250, reply
            code, reply = client.rcpt(f"urgent{n:02d}@ops.test")
            assert code == 250, reply
            code, reply = client.data(
                f"From: {URGENT_SENDER}\r\nTo: urgent{n:02d}@ops.test\r\n"
                f"Subject: {tag} urgent {n}\r\n\r\nThe server is on fire.\r\n"
            )
            assert code == 250, reply
            if n == 0:
                mark = send.log.size()
                first_250 = wall()
                cli_thread.start()
        last_250 = wall()
        client.quit()
        cli_thread.join(30)
        assert cli, "smtpgw-admin campaign show did not answer"
        wait_until(lambda: poller.resumed(last_250), 30, "the send shown going on again")
    finally:
        poller.stopping.set()
        poller.join(10)
        client.close()
    assert not poller.errors, poller.errors
    return Burst(started, int(mark), first_250, last_250, poller.samples, cli[0])


@frozen
class Figures:
    between: int
    burst_for: float
    first_paused_after: float
    paused_for: float
    target_gap: float
    urgent_latency: float


def check_burst(send: Send, burst: Burst) -> Figures:
    """
    Check the order in the target's log and what the API and the CLI showed
    (see the module's description); return the figures.
    """
    wait_until(
        lambda: sum(1 for t in send.log.refresh() if t.sender == URGENT_SENDER) >= URGENT,
        30,
        "the priority-1 messages at the target",
    )
    taken = send.log.refresh()
    urgent = [i for i, t in enumerate(taken) if t.sender == URGENT_SENDER]
    urgent_now = [i for i in urgent if taken[i].offset >= burst.mark]
    assert len(urgent_now) == URGENT, [taken[i].recipient for i in urgent]
    assert len({taken[i].recipient for i in urgent_now}) == URGENT
    last_urgent = urgent_now[-1]
    received = {t.recipient_number for t in taken if t.console and t.offset < burst.mark}
    pending = [n for n in range(1, RECIPIENTS + 1) if n not in received]
    # Those that may have been in flight when the gate closed.
    in_flight = set(pending[:CONCURRENCY])
    between = [t for t in taken[: last_urgent + 1] if t.console and t.offset >= burst.mark]
    assert len(between) <= CONCURRENCY, (
        f"{len(between)} console messages between the first 250 and the last priority-1 "
        f"message; at most {CONCURRENCY} could have been in flight"
    )
    late = [t.recipient for t in between if t.recipient_number not in in_flight]
    assert not late, (
        f"console messages dispatched after the priority-1 mail arrived were delivered before "
        f"the last of it: {late}"
    )
    # The send is shown as paused, with its reason, while they go: the
    # runner writes it at once (not at its next look, a second later), and
    # the gate stays closed at least until the grace period after the
    # target took the last priority-1 message, so every answer read
    # until then says paused.
    last_delivered = taken[last_urgent].received_at
    spell_end = last_delivered + GRACE
    before = [s for s in burst.samples if s.at < burst.started]
    assert before, "no sample before the burst"
    assert before[-1].state == "sending", before[-1]
    paused = [s for s in burst.samples if s.at >= burst.first_250 and s.state == "paused"]
    assert paused, f"the API never showed the send paused: {burst.samples[-5:]}"
    first_paused = paused[0].at
    assert first_paused - burst.first_250 < 0.5, (
        f"the API showed the pause {first_paused - burst.first_250:.3f} s after the first 250"
    )
    spell = [s for s in burst.samples if first_paused <= s.at <= spell_end]
    wrong = [s for s in spell if (s.state, s.reason) != ("paused", PAUSED_REASON)]
    assert not wrong, f"not shown paused for {PAUSED_REASON!r} while pre-empted: {wrong}"
    assert spell[-1].at >= last_delivered, "no answer after the last priority-1 delivery"
    going = [s for s in burst.samples if s.at > first_paused and s.state != "paused"]
    assert going[0].state == "sending", going[0]
    resumed_at = going[0].at
    # The CLI, run once the API showed the pause, shows it too, unless it
    # ran past the spell.
    document, _, cli_ended = burst.cli
    if cli_ended <= spell_end or document["state"] == "paused":
        assert (document["state"], document["paused_reason"]) == ("paused", PAUSED_REASON), (
            document
        )
    else:
        assert document["state"] == "sending", document
        print(f"the CLI answered {cli_ended - spell_end:.3f} s after the pause")
    # The send goes on afterwards, once the grace period after the last
    # priority-1 message has passed (messages that were in flight at the
    # first 250 may still land before).
    send.wait_console(len(received) + CONCURRENCY + 50, 30)
    taken = send.log.refresh()
    after = [
        t for t in taken[last_urgent + 1 :] if t.console and t.recipient_number not in in_flight
    ]
    assert after, "no console message after the priority-1 messages"
    gap = after[0].received_at - taken[last_urgent].received_at
    # The gateway finished the last one after the target took it.
    assert gap >= GRACE, f"the send went on {gap:.3f} s after the last priority-1 message"
    latency = taken[last_urgent].received_at - burst.first_250
    return Figures(
        between=len(between),
        burst_for=burst.last_250 - burst.first_250,
        first_paused_after=first_paused - burst.first_250,
        paused_for=resumed_at - first_paused,
        target_gap=gap,
        urgent_latency=latency,
    )


def wait_finished(send: Send, timeout: float) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def finished() -> bool:
        document = send.show()
        found[:] = [document]
        return bool(document["state"] == "finished")

    wait_until(finished, timeout, "the send to finish")
    return found[0]


def console_counts(send: Send) -> collections.Counter[str]:
    return collections.Counter(t.recipient for t in send.log.refresh() if t.console)


def test_priority_1_mail_pre_empts_a_console_send_that_then_finishes(send: Send) -> None:
    """
    A console send to 5,000 recipients at C{--rate 200}: 20 priority-1
    SMTP+ messages sent midway are all delivered before any console message
    dispatched after the first was accepted (at most C{--concurrency}
    messages in flight at that instant land among them); the API and the
    CLI show the send paused for "priority-1 SMTP+ traffic" while they go;
    it goes on and finishes, every recipient getting it exactly once.
    """
    started = time.monotonic()
    send.wait_console(BURST_AFTER)
    burst = send_urgent(send, "midway")
    figures = check_burst(send, burst)
    document = wait_finished(send, 90)
    wait_until(
        lambda: sum(console_counts(send).values()) >= RECIPIENTS,
        30,
        "every console message at the target",
    )
    counts = console_counts(send)
    assert set(counts) == send.addresses
    twice = {a: n for a, n in counts.items() if n > 1}
    assert not twice, f"recipients that got the send more than once: {twice}"
    urgent = [t for t in send.log.refresh() if t.sender == URGENT_SENDER]
    assert len(urgent) == URGENT
    assert len(send.log.taken) == RECIPIENTS + URGENT
    assert (document["sent"], document["total"]) == (RECIPIENTS, RECIPIENTS), document
    assert document["in_doubt"] == 0, document
    wait_until(lambda: send.show()["delivered"] == RECIPIENTS, 10, "the delivered count")
    elapsed = time.monotonic() - started
    taken = send.log.taken
    console_times = [t.received_at for t in taken if t.console]
    span = console_times[-1] - console_times[0]
    print(
        f"pre-emption: {figures.between} console messages (of {CONCURRENCY} possible in flight) "
        f"landed between the first 250 and the last priority-1 message; the API showed the "
        f"send paused {figures.first_paused_after * 1000:.0f} ms after the first 250 (the 20 "
        f"took {figures.burst_for * 1000:.0f} ms), for "
        f"{figures.paused_for:.2f} s; the target took the next console message "
        f"{figures.target_gap:.2f} s after the last priority-1 one (grace {GRACE} s); first "
        f"250 to the last priority-1 delivery {figures.urgent_latency * 1000:.0f} ms; "
        f"{RECIPIENTS} console messages in {span:.1f} s ({RECIPIENTS / span:.0f}/s at "
        f"--rate {RATE}); test {elapsed:.1f} s"
    )
    assert send.gw.stop(), send.gw.log_tail()


@pytest.mark.slow
def test_kill_9_midway_then_priority_1_mail_and_the_send_finishes(send: Send) -> None:
    """
    The same send, with a C{kill -9} of the gateway at a random moment in
    the middle and a restart: the send goes on where it stopped, is
    pre-empted by priority-1 mail as before, and finishes; every recipient
    gets it at least once, and the recipients who got it twice are no more
    than the deliveries the gateway reports as in flight at the kill (the
    send's C{in_doubt}, which is also what the queue's replay found).
    """
    seed = int(os.environ.get("SMTPGW_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    started = time.monotonic()
    send.wait_console(rng.randrange(BURST_AFTER, 2 * BURST_AFTER))
    threading.Event().wait(rng.uniform(0.0, 0.3))
    send.gw.kill9()
    at_kill = console_counts(send)
    restarted = time.monotonic()
    send.gw.start()
    send.gw.wait_admin()
    send.wait_console(sum(at_kill.values()) + 500)
    burst = send_urgent(send, "after-restart")
    figures = check_burst(send, burst)
    document = wait_finished(send, 90)
    wait_until(
        lambda: set(console_counts(send)) >= send.addresses,
        30,
        "every recipient at the target",
    )
    counts = console_counts(send)
    assert set(counts) == send.addresses, set(counts) - send.addresses
    duplicates = sum(n - 1 for n in counts.values())
    assert (document["sent"], document["total"]) == (RECIPIENTS, RECIPIENTS), document
    in_doubt = document["in_doubt"]
    replayed = sum(
        int(n)
        for n in re.findall(
            r"(\d+) messages were being delivered when the gateway stopped without finishing",
            send.gw.log_text(),
        )
    )
    elapsed = time.monotonic() - started
    print(
        f"kill -9 (seed {seed}) after {sum(at_kill.values())} console messages: "
        f"{duplicates} duplicate deliveries; the send's in_doubt {in_doubt}, the queue's "
        f"replay found {replayed} being delivered (concurrency {CONCURRENCY}); restart to "
        f"finish {time.monotonic() - restarted:.1f} s; after the restart {figures.between} "
        f"console messages landed among the priority-1 ones, shown paused "
        f"{figures.first_paused_after * 1000:.0f} ms after the first 250 for "
        f"{figures.paused_for:.2f} s; delivered count {document['delivered']}; test "
        f"{elapsed:.1f} s"
    )
    assert in_doubt == replayed, (in_doubt, replayed)
    assert in_doubt <= CONCURRENCY
    assert duplicates <= in_doubt, (
        f"{duplicates} duplicate deliveries, but the gateway reported {in_doubt} in flight"
    )
    assert send.gw.stop(), send.gw.log_tail()
