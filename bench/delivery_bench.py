"""
Delivery throughput (issue 3): the gateway and a throwaway Postfix each
deliver the same number of queued messages to Postfix's C{smtp-sink}, in one
run on 127.0.0.1.

    python -m bench.delivery_bench                     # 20,000 x 5 KB each
    python -m bench.delivery_bench --messages 5000     # quicker
    python -m bench.delivery_bench --only gateway

For each server: start a fresh C{smtp-sink -c} (it prints running counters),
start the server relaying everything to it with delivery held, load the
messages with L{bench.loadgen} over reused connections, release delivery and
time from the release command until the sink has counted every message
(or the wall-clock cap, or no progress for C{--stall} seconds). The
server's CPU over that window comes from C{/proc}. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attrs import define, evolve, frozen

from bench import loadgen
from bench.procstat import MachineCpu, cpu_count, tree_cpu_seconds
from bench.servers import (
    LOOPBACK,
    Postfix,
    ServerError,
    free_port,
    gateway_unavailable,
    log_problems,
    wait_for_port,
)

#: The issue's target: gateway delivery rate / Postfix delivery rate.
TARGET_RATIO = 1.0

#: How often the sink's counter is read while waiting.
POLL_SECONDS = 0.02

#: C{smtp-sink -c} writes its counters, each update ending in CR:
#: "sess=N quit=N mesg=N"; C{mesg} counts final dots.
_SINK_COUNT = re.compile(rb"mesg=(\d+)")
_SINK_SESSIONS = re.compile(rb"sess=(\d+)")

#: How much of the end of the sink's output holds its latest counters.
_SINK_TAIL = 256


def _terminate(process: subprocess.Popen[bytes], grace: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@define
class CountingSink:
    """
    C{smtp-sink -c} on a free loopback port, its counters read from its
    output file.
    """

    workdir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def output(self) -> Path:
        """
        @return: the file the sink writes its counters to.
        """
        return self.workdir / "smtp-sink.out"

    def start(self) -> None:
        """
        Start the sink and wait for its port.
        """
        self.port = free_port()
        with self.output.open("wb") as output:
            # As root it must be told whom to run as.
            self.process = subprocess.Popen(
                ["smtp-sink", "-c", "-u", "nobody", "-4", f"{LOOPBACK}:{self.port}", "1024"],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, self.process, self.output, 10, poll=POLL_SECONDS)

    def _latest(self, pattern: re.Pattern[bytes]) -> int:
        try:
            with self.output.open("rb") as output:
                output.seek(max(0, output.seek(0, os.SEEK_END) - _SINK_TAIL))
                found = pattern.findall(output.read())
        except OSError:
            return 0
        return int(found[-1]) if found else 0

    def count(self) -> int:
        """
        @return: how many messages (final dots) the sink has received so far.
        """
        return self._latest(_SINK_COUNT)

    def sessions(self) -> int:
        """
        @return: how many SMTP sessions to the sink have ended so far.
        """
        return self._latest(_SINK_SESSIONS)

    def stop_after(self, server_stopped: bool) -> int:
        """
        Stop the sink, once the sessions of a stopped server have closed.

        @param server_stopped: whether the server that sent to it has exited.
        @return: how many sessions it saw end.
        """
        if server_stopped:
            time.sleep(0.5)
        sessions = self.sessions()
        self.stop()
        return sessions

    def stop(self) -> None:
        """
        Stop the sink.
        """
        if self.process is not None:
            _terminate(self.process, 5)


@frozen
class Delivery:
    """
    One server's measured delivery.

    @ivar name: the server.
    @ivar messages: how many messages were loaded for delivery.
    @ivar accepted: how many the server accepted from the load generator.
    @ivar load_seconds: how long loading took.
    @ivar early: messages the sink received before delivery was released
        (should be 0).
    @ivar delivered: messages the sink received after the release.
    @ivar seconds: from the release command to the last message counted.
    @ivar first_seconds: from the release command to the first message.
    @ivar server_cpu: the server's CPU seconds (process tree) in that window.
    @ivar sink_cpu: the sink's CPU seconds in that window.
    @ivar other_cores: CPU the rest of the machine used, in cores.
    @ivar stopped: why waiting ended early, or L{None} when all arrived.
    @ivar notes: facts that qualify the figures.
    @ivar log_problems: problem lines in the server's log.
    @ivar connections: SMTP sessions the sink saw end (read after the
        server stopped, so every session the server opened).
    """

    name: str
    messages: int
    accepted: int
    load_seconds: float
    early: int
    delivered: int
    seconds: float
    first_seconds: float | None
    server_cpu: float
    sink_cpu: float
    other_cores: float
    stopped: str | None
    notes: tuple[str, ...]
    log_problems: dict[str, Any]
    connections: int = 0

    @property
    def rate(self) -> float:
        """
        @return: messages delivered per second, from the release.
        """
        return self.delivered / max(self.seconds, 1e-9)

    @property
    def steady_rate(self) -> float | None:
        """
        @return: messages per second from the first delivered to the last
            (without the release command's start-up), or L{None}.
        """
        if self.first_seconds is None or self.delivered < 2:
            return None
        return (self.delivered - 1) / max(self.seconds - self.first_seconds, 1e-9)

    def summary(self) -> dict[str, Any]:
        """
        @return: a JSON-ready summary.
        """
        return {
            "name": self.name,
            "messages": self.messages,
            "accepted": self.accepted,
            "load_s": round(self.load_seconds, 3),
            "early": self.early,
            "delivered": self.delivered,
            "delivery_s": round(self.seconds, 3),
            "first_s": None if self.first_seconds is None else round(self.first_seconds, 3),
            "rate_per_s": round(self.rate, 1),
            "steady_rate_per_s": None if self.steady_rate is None else round(self.steady_rate, 1),
            "server_cores": round(self.server_cpu / max(self.seconds, 1e-9), 2),
            "server_cpu_ms_per_msg": round(1000 * self.server_cpu / max(self.delivered, 1), 3),
            "sink_cores": round(self.sink_cpu / max(self.seconds, 1e-9), 2),
            "other_cores": round(self.other_cores, 2),
            "stopped": self.stopped,
            "notes": list(self.notes),
            "log_problems": self.log_problems,
            "sink_connections": self.connections,
        }


@frozen
class Settings:
    """
    What every row does.

    @ivar messages: messages loaded and delivered per server.
    @ivar size: bytes per message.
    @ivar sessions: concurrent load sessions.
    @ivar per_session: messages per load connection (the gateway refuses
        more than C{--max-messages-per-session}, 1000 by default).
    @ivar time_limit: wall-clock cap of each load and each delivery, seconds.
    @ivar stall: give up a delivery after this long without progress.
    """

    messages: int
    size: int
    sessions: int
    per_session: int
    time_limit: float
    stall: float


def _load(settings: Settings, port: int, user: str | None, password: str | None) -> Any:
    spec = loadgen.LoadSpec(
        port=port,
        messages=settings.messages,
        sessions=settings.sessions,
        per_session=settings.per_session,
        size=settings.size,
        username=user,
        password=password,
        time_limit=settings.time_limit,
        tag="delivery",
    )
    return loadgen.run_here(spec)


def _measure_delivery(
    name: str,
    settings: Settings,
    sink: CountingSink,
    server_pid: int,
    release: Sequence[Sequence[str]],
    expected: int,
) -> tuple[int, int, float, float | None, float, float, float, str | None]:
    """
    Release delivery and wait for the sink to count C{expected} messages
    (those the server accepted).

    @return: early, delivered, seconds, first_seconds, server CPU, sink CPU,
        other cores, and why waiting stopped early (or L{None}).
    """
    assert sink.process is not None
    early = sink.count()
    machine_before = MachineCpu.now()
    server_before = tree_cpu_seconds(server_pid)
    sink_before = tree_cpu_seconds(sink.process.pid)
    started = time.monotonic()
    for argv in release:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise ServerError(f"{name}: {' '.join(argv)}: {done.stderr.strip()}")
    first: float | None = None
    last_progress = started
    seen = early
    stopped: str | None = None
    finished = started
    while True:
        count = sink.count()
        now = time.monotonic()
        if count > seen:
            seen, last_progress, finished = count, now, now
            if first is None:
                first = now - started
        if seen - early >= expected:
            break
        if now - started > settings.time_limit:
            stopped = f"wall-clock cap of {settings.time_limit:.0f}s"
            break
        if now - last_progress > settings.stall:
            stopped = f"no progress for {settings.stall:.0f}s"
            break
        time.sleep(POLL_SECONDS)
    server_cpu = tree_cpu_seconds(server_pid) - server_before
    sink_cpu = tree_cpu_seconds(sink.process.pid) - sink_before
    machine_after = MachineCpu.now()
    # A stall or the cap ends the wait later than the last message: the
    # rate is over the time the messages actually took.
    seconds = (finished if seen > early else time.monotonic()) - started
    busy = machine_after.busy - machine_before.busy
    elapsed_machine = max(time.monotonic() - started, 1e-9)
    other = max(0.0, busy - server_cpu - sink_cpu) / elapsed_machine
    return early, seen - early, seconds, first, server_cpu, sink_cpu, other, stopped


def _admin_argv(data_dir: Path, *args: str) -> list[str]:
    admin = Path(sys.executable).with_name("smtpgw-admin")
    return [str(admin), "--data-dir", str(data_dir), "--json", *args]


def _admin(data_dir: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        _admin_argv(data_dir, *args), capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise ServerError(f"smtpgw-admin {' '.join(args)}: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
    return result


def run_gateway(settings: Settings, workdir: Path) -> Delivery:
    """
    The gateway relaying to the sink as its smarthost: queue stopped while
    the messages are loaded, then started.
    """
    base = workdir / "gateway"
    data_dir = base / "data"
    data_dir.mkdir(parents=True)
    sink = CountingSink(base)
    sink.start()
    process: subprocess.Popen[bytes] | None = None
    log = base / "gateway.log"
    try:
        _admin(data_dir, "list", "add", "bench")
        user = _admin(data_dir, "user", "add", "--list", "bench", "--domains", "example.com")
        port = free_port()
        twistd = Path(sys.executable).with_name("twistd")
        argv = [str(twistd), "-n", "--pidfile=", "smtpgw", "--data-dir", str(data_dir)]
        argv += ["--ports", str(port), "--interface", LOOPBACK, "--hostname", "bench.test"]
        argv += ["--relay", f"smtp://{LOOPBACK}:{sink.port}"]
        with log.open("ab") as output:
            process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, cwd=base)
        wait_for_port(port, process, log, 60, poll=POLL_SECONDS)
        deadline = time.monotonic() + 30
        while True:
            try:
                _admin(data_dir, "queue", "stop")
                break
            except ServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        loaded = _load(settings, port, str(user["username"]), str(user["password"]))
        early, delivered, seconds, first, server_cpu, sink_cpu, other, stopped = _measure_delivery(
            "gateway",
            settings,
            sink,
            process.pid,
            [_admin_argv(data_dir, "queue", "start")],
            loaded.accepted,
        )
        delivery = Delivery(
            name="gateway",
            messages=settings.messages,
            accepted=loaded.accepted,
            load_seconds=loaded.elapsed,
            early=early,
            delivered=delivered,
            seconds=seconds,
            first_seconds=first,
            server_cpu=server_cpu,
            sink_cpu=sink_cpu,
            other_cores=other,
            stopped=stopped,
            notes=(
                "--relay smtp://127.0.0.1:SINK, --concurrency 20 (default)",
                "release: smtpgw-admin queue start (its Python start-up is in the time)",
            ),
            log_problems=log_problems(log),
        )
    finally:
        if process is not None:
            _terminate(process, 30)
        connections = sink.stop_after(process is not None)
    return evolve(delivery, connections=connections)


@define
class RelayingPostfix(Postfix):
    """
    L{Postfix} as L{bench.servers} builds it, but relaying everything to
    the sink instead of discarding it, and holding every message on arrival
    (a C{header_checks} HOLD) so that nothing is delivered while loading.
    """

    @staticmethod
    def _main_cf(base: Path, queue: Path, data: Path, maillog: Path, tls: Any) -> str:
        text = Postfix._main_cf(base, queue, data, maillog, tls)
        # Replaced through the settings; main.cf must not name them twice.
        dropped = ("default_transport", "relay_transport", "local_transport")
        return "".join(
            line + "\n"
            for line in text.splitlines()
            if line.split("=", 1)[0].strip() not in dropped
        )


def postfix_unavailable() -> str | None:
    """
    @return: why the Postfix row cannot run here, or L{None}.
    """
    if shutil.which("smtp-sink") is None:
        return "smtp-sink not installed (Debian package postfix)"
    return Postfix().unavailable()


def run_postfix(settings: Settings, workdir: Path) -> Delivery:
    """
    A throwaway Postfix relaying to the sink: messages held on arrival,
    then released (C{postsuper -H ALL}) and flushed (C{postqueue -f}).
    """
    base = workdir / "postfix-row"
    base.mkdir(parents=True)
    sink = CountingSink(base)
    sink.start()
    checks = base / "hold.regexp"
    checks.write_text("/^Subject:/ HOLD\n")
    postfix = RelayingPostfix(
        settings=(
            f"relayhost = [{LOOPBACK}]:{sink.port}",
            "default_transport = smtp",
            "relay_transport = smtp",
            "local_transport = smtp",
            "smtp_tls_security_level = none",
            "smtp_host_lookup = native",
            f"header_checks = regexp:{checks}",
        )
    )
    try:
        started = postfix.start(base)
        assert postfix.config is not None
        config = str(postfix.config)
        loaded = _load(settings, started.port, None, None)
        early, delivered, seconds, first, server_cpu, sink_cpu, other, stopped = _measure_delivery(
            "postfix",
            settings,
            sink,
            started.root_pid,
            [
                ["postsuper", "-c", config, "-H", "ALL"],
                ["postqueue", "-c", config, "-f"],
            ],
            loaded.accepted,
        )
        delivery = Delivery(
            name="postfix",
            messages=settings.messages,
            accepted=loaded.accepted,
            load_seconds=loaded.elapsed,
            early=early,
            delivered=delivered,
            seconds=seconds,
            first_seconds=first,
            server_cpu=server_cpu,
            sink_cpu=sink_cpu,
            other_cores=other,
            stopped=stopped,
            notes=(
                *started.notes[:1],
                "relayhost [127.0.0.1]:SINK, held on arrival; "
                "release: postsuper -H ALL; postqueue -f",
                "default_destination_concurrency_limit 20 (default), connection cache on demand",
            ),
            log_problems=log_problems(started.log),
        )
    finally:
        postfix.stop()
        connections = sink.stop_after(True)
    return evolve(delivery, connections=connections)


def _print_table(rows: Sequence[Delivery], skipped: dict[str, str]) -> None:
    header = (
        f"{'server':<8} {'loaded':>7} {'deliv.':>7} {'secs':>7} {'first s':>7} "
        f"{'msg/s':>8} {'steady':>8} {'conns':>5} {'srv cores':>9} {'srv ms/msg':>10} "
        f"{'sink cores':>10} {'other':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        first = "-" if row.first_seconds is None else f"{row.first_seconds:.2f}"
        steady = "-" if row.steady_rate is None else f"{row.steady_rate:.1f}"
        print(
            f"{row.name:<8} {row.accepted:>7} {row.delivered:>7} {row.seconds:>7.2f} "
            f"{first:>7} {row.rate:>8.1f} {steady:>8} {row.connections:>5} "
            f"{row.server_cpu / max(row.seconds, 1e-9):>9.2f} "
            f"{1000 * row.server_cpu / max(row.delivered, 1):>10.3f} "
            f"{row.sink_cpu / max(row.seconds, 1e-9):>10.2f} {row.other_cores:>6.2f}"
        )
        for note in row.notes:
            print(f"    {note}")
        if row.accepted < row.messages:
            print(f"    WARNING: the server accepted {row.accepted} of {row.messages} messages")
        if row.early:
            print(f"    WARNING: {row.early} messages reached the sink before the release")
        if row.stopped:
            print(f"    INCOMPLETE: {row.stopped}")
        if row.log_problems["count"]:
            print(f"    log problems: {row.log_problems['count']}: {row.log_problems['first']}")
    for name, reason in skipped.items():
        print(f"{name:<8} SKIPPED: {reason}")


def _ratio(rows: Sequence[Delivery]) -> float | None:
    by_name = {row.name: row for row in rows}
    gateway, postfix = by_name.get("gateway"), by_name.get("postfix")
    if gateway is None or postfix is None or postfix.rate <= 0:
        return None
    return gateway.rate / postfix.rate


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the delivery benchmark and print its table, ratio and JSON.

    @return: the exit status (1 when a server could not be run).
    """
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="per server (20000)")
    parser.add_argument("--size", type=int, default=5 * 1024, help="bytes per message (5120)")
    parser.add_argument("--sessions", type=int, default=20, help="load sessions (20)")
    parser.add_argument(
        "--per-session", type=int, default=500, help="messages per load connection (500)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=300.0, help="cap of each load and delivery, s (300)"
    )
    parser.add_argument(
        "--stall", type=float, default=30.0, help="give up after this long without progress (30)"
    )
    parser.add_argument("--only", choices=("gateway", "postfix"), help="run one server only")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json-out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= 2_000_000:
        parser.error("--messages must be between 1 and 2,000,000")
    settings = Settings(
        messages=args.messages,
        size=args.size,
        sessions=args.sessions,
        per_session=args.per_session,
        time_limit=args.time_limit,
        stall=args.stall,
    )
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    print(
        f"delivery benchmark {when}: {settings.messages} x {settings.size} B per server, "
        f"{cpu_count()} CPUs, load average {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}"
    )
    skipped: dict[str, str] = {}
    rows: list[Delivery] = []
    failed = False
    workdir = Path(tempfile.mkdtemp(prefix="smtpgw-delivery-", dir=args.workdir))
    # Postfix's own users must reach their directories inside it.
    workdir.chmod(0o711)
    try:
        plan = [("gateway", run_gateway), ("postfix", run_postfix)]
        reasons = {"gateway": _gateway_unavailable, "postfix": postfix_unavailable}
        for name, run in plan:
            if args.only is not None and args.only != name:
                continue
            reason = reasons[name]()
            if reason is not None:
                skipped[name] = reason
                continue
            print(f"running {name}...", flush=True)
            try:
                rows.append(run(settings, workdir))
            except (ServerError, OSError, subprocess.SubprocessError) as error:
                failed = True
                skipped[name] = f"ERROR: {error}"
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    _print_table(rows, skipped)
    ratio = _ratio(rows)
    if ratio is None:
        print(f"\ngateway / postfix delivery: not measured (target >= {TARGET_RATIO:.1f}x)")
    else:
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(
            f"\ngateway / postfix delivery: {ratio:.2f}x "
            f"(target >= {TARGET_RATIO:.1f}x: {verdict})"
        )
    load_after = os.getloadavg()
    summary = {
        "when": when,
        "cpus": cpu_count(),
        "loadavg_before": [round(value, 2) for value in load_before],
        "loadavg_after": [round(value, 2) for value in load_after],
        "settings": {
            "messages": settings.messages,
            "size": settings.size,
            "sessions": settings.sessions,
            "per_session": settings.per_session,
            "time_limit_s": settings.time_limit,
            "stall_s": settings.stall,
        },
        "rows": [row.summary() for row in rows],
        "skipped": skipped,
        "ratio_gateway_postfix": None if ratio is None else round(ratio, 3),
        "target_ratio": TARGET_RATIO,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    return 1 if failed else 0


def _gateway_unavailable() -> str | None:
    if shutil.which("smtp-sink") is None:
        return "smtp-sink not installed (Debian package postfix)"
    return gateway_unavailable()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
