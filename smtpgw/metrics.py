"""
Prometheus metrics of the gateway, for the admin app's C{/metrics}.

L{GatewayMetrics} owns its own L{CollectorRegistry} (never the process-wide
default one), so that two gateways in one process, or two tests, never
share a counter. It is fed three ways:

  - the SMTP sessions call L{GatewayMetrics.connection_opened},
    L{connection_closed <GatewayMetrics.connection_closed>},
    L{accepted <GatewayMetrics.accepted>} and
    L{rejected <GatewayMetrics.rejected>} (the L{SessionMetrics} protocol);
  - the journal's writer thread calls L{GatewayMetrics.observe_fsync} with
    the duration of each group commit's fsync (C{prometheus_client} is
    thread-safe);
  - the queue's L{stats() <QueueStatsSource.stats>} is read at scrape time
    by a collector, so the hot paths of the queue pay nothing for metrics.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from smtpgw.interfaces import DeliveryResult
from smtpgw.model import MessageState, Priority

__all__ = [
    "FSYNC_BUCKETS",
    "REJECT_REASONS",
    "GatewayMetrics",
    "QueueStatsSource",
    "RejectReason",
    "SessionMetrics",
]


class RejectReason(enum.StrEnum):
    """
    Why the gateway refused a client, as the C{reason} label of
    C{smtpgw_messages_rejected_total}: a fixed set, so the label stays
    bounded whatever a caller passes (anything else counts as C{other}).
    """

    AUTH_REQUIRED = "auth_required"
    AUTH_FAILED = "auth_failed"
    AUTH_THROTTLED = "auth_throttled"
    SENDER_UNAUTHORIZED = "sender_unauthorized"
    HEADER_FROM_UNAUTHORIZED = "header_from_unauthorized"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    TOO_LARGE = "too_large"
    #: A bare CR or LF, a NUL, or a line over the limit in the message.
    BAD_LINE = "bad_line"
    TLS_REQUIRED = "tls_required"
    JOURNAL_UNAVAILABLE = "journal_unavailable"
    OTHER = "other"


REJECT_REASONS: Final = tuple(reason.value for reason in RejectReason)

#: Seconds; a local disk syncs in well under a millisecond to tens of
#: milliseconds, a struggling one in seconds.
FSYNC_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

#: The outcomes of one recipient of a delivery attempt.
_RECIPIENT_OUTCOMES: Final = ("delivered", "deferred", "bounced")


class SessionMetrics(Protocol):
    """
    What the SMTP sessions report; L{GatewayMetrics} is one.
    """

    def connection_opened(self) -> None:
        """
        A client connected (also one refused for too many connections).
        """

    def connection_closed(self) -> None:
        """
        A connection counted by L{connection_opened} ended.
        """

    def accepted(self) -> None:
        """
        A message was answered C{250} with its queue id.
        """

    def rejected(self, reason: str) -> None:
        """
        A client was refused, for one of the L{RejectReason}s.
        """


class _QueueStats(Protocol):
    # The fields of smtpgw.queue.QueueStats the collector reads.
    @property
    def delivered(self) -> int: ...
    @property
    def deferred(self) -> int: ...
    @property
    def bounced(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def queued_by_priority(self) -> Mapping[Priority, int]: ...
    @property
    def by_state(self) -> Mapping[MessageState, int]: ...
    @property
    def paused(self) -> bool: ...


class QueueStatsSource(Protocol):
    """
    Anything with the C{stats()} of L{smtpgw.queue.MessageQueue}.
    """

    def stats(self) -> _QueueStats:
        """
        The queue's counters, now.
        """


class _QueueCollector:
    """
    Reads the queue's counters at scrape time.
    """

    def __init__(self, queue: QueueStatsSource) -> None:
        self._queue = queue

    def describe(self) -> list[Any]:
        # Known names without calling stats() at registration.
        return list(self._families(None))

    def collect(self) -> Iterator[Any]:
        return self._families(self._queue.stats())

    def _families(self, stats: _QueueStats | None) -> Iterator[Any]:
        by_priority = GaugeMetricFamily(
            "smtpgw_queue_messages",
            "Messages ready to be sent, by priority (1 is the highest).",
            labels=["priority"],
        )
        by_state = GaugeMetricFamily(
            "smtpgw_queue_messages_by_state",
            "Messages in the scheduler, by state.",
            labels=["state"],
        )
        in_flight = GaugeMetricFamily("smtpgw_deliveries_in_flight", "Deliveries under way.")
        delivered = CounterMetricFamily(
            "smtpgw_delivered", "Messages that reached every recipient, since start."
        )
        deferred = CounterMetricFamily(
            "smtpgw_deferred",
            "Attempts after which some recipient was left to retry, since start.",
        )
        bounced = CounterMetricFamily(
            "smtpgw_bounced",
            "Messages done with a recipient that failed for good, since start.",
        )
        paused = GaugeMetricFamily(
            "smtpgw_queue_paused", "1 while an admin has stopped the queue, else 0."
        )
        if stats is not None:
            queued = stats.queued_by_priority
            for priority in Priority:
                by_priority.add_metric([str(int(priority))], queued.get(priority, 0))
            states = stats.by_state
            for state in MessageState:
                by_state.add_metric([state.value], states.get(state, 0))
            in_flight.add_metric([], stats.in_flight)
            delivered.add_metric([], stats.delivered)
            deferred.add_metric([], stats.deferred)
            bounced.add_metric([], stats.bounced)
            paused.add_metric([], 1 if stats.paused else 0)
        yield from (by_priority, by_state, in_flight, delivered, deferred, bounced, paused)


class GatewayMetrics:
    """
    The gateway's metrics, in a registry of their own.

    @ivar registry: the L{CollectorRegistry} that L{render} exposes.
    """

    def __init__(self, queue: QueueStatsSource | None = None) -> None:
        """
        @param queue: whose C{stats()} to expose; see L{track_queue}.
        """
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self._connections = Counter(
            "smtpgw_connections", "SMTP connections accepted.", registry=registry
        )
        self._open = Gauge(
            "smtpgw_connections_open", "SMTP connections now open.", registry=registry
        )
        self._accepted = Counter(
            "smtpgw_messages_accepted",
            "Messages answered 250 (durable in the journal).",
            registry=registry,
        )
        rejected = Counter(
            "smtpgw_messages_rejected",
            "Clients refused, by reason (AUTH, sender policy, limits, storage).",
            ["reason"],
            registry=registry,
        )
        # Children made once: a refusal costs a dictionary lookup and an
        # increment, and every reason is exposed (at 0) from the start.
        self._rejected = {reason: rejected.labels(reason) for reason in REJECT_REASONS}
        self._rejected_other = self._rejected[RejectReason.OTHER.value]
        self._fsync = Histogram(
            "smtpgw_journal_fsync_seconds",
            "Time the journal's group commits spent in fsync.",
            buckets=FSYNC_BUCKETS,
            registry=registry,
        )
        attempts = Counter(
            "smtpgw_delivery_recipients",
            "Recipients of delivery attempts, by outcome of the attempt.",
            ["outcome"],
            registry=registry,
        )
        self._recipients = {outcome: attempts.labels(outcome) for outcome in _RECIPIENT_OUTCOMES}
        self._attempts = Counter(
            "smtpgw_delivery_attempts", "Delivery attempts made.", registry=registry
        )
        self._queue_collector: _QueueCollector | None = None
        if queue is not None:
            self.track_queue(queue)

    def track_queue(self, queue: QueueStatsSource) -> None:
        """
        Expose C{queue.stats()} as the C{smtpgw_queue_*}, C{smtpgw_delivered},
        C{smtpgw_deferred}, C{smtpgw_bounced} and C{smtpgw_deliveries_in_flight}
        metrics, read at each scrape.

        @raise ValueError: when a queue is already tracked.
        """
        if self._queue_collector is not None:
            raise ValueError("these metrics already track a queue")
        self._queue_collector = _QueueCollector(queue)
        self.registry.register(self._queue_collector)

    # SessionMetrics

    def connection_opened(self) -> None:
        """
        Count a new connection, and one more open.
        """
        self._connections.inc()
        self._open.inc()

    def connection_closed(self) -> None:
        """
        One connection fewer open.
        """
        self._open.dec()

    def accepted(self) -> None:
        """
        Count an accepted message.
        """
        self._accepted.inc()

    def rejected(self, reason: str) -> None:
        """
        Count a refusal; a reason outside L{RejectReason} counts as C{other}.
        """
        self._rejected.get(reason, self._rejected_other).inc()

    # The journal's writer thread

    def observe_fsync(self, seconds: float) -> None:
        """
        Record one group commit's fsync time. Safe from any thread: give
        it to L{smtpgw.journal.FileJournal} as C{fsync_observer}.
        """
        self._fsync.observe(seconds)

    # Outbound

    def delivery_attempted(self, result: DeliveryResult) -> None:
        """
        Count one delivery attempt and its recipients by outcome.
        """
        self._attempts.inc()
        if result.delivered:
            self._recipients["delivered"].inc(len(result.delivered))
        if result.deferred:
            self._recipients["deferred"].inc(len(result.deferred))
        if result.bounced:
            self._recipients["bounced"].inc(len(result.bounced))

    def render(self) -> tuple[bytes, str]:
        """
        The exposition of every metric, for an HTTP answer.

        @return: the body and its C{Content-Type}.
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
