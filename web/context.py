"""
What the admin app works with: the gateway's stores and controls, and what
the pages show about the gateway's own settings.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime

from smtpgw.admins import LoginThrottle

__all__ = ["GatewaySettings", "WebContext"]


@frozen
class GatewaySettings:
    """
    The gateway's settings as the SMTP+ settings page shows them.

    @ivar hostname: the server address clients connect to.
    @ivar ports: the SMTP ports, as C{--ports} says them.
    @ivar require_tls: whether AUTH needs STARTTLS first.
    @ivar base_url: where the admin app is reached, for links in mail
        (unsubscribe); empty when unknown (links are then relative).
    """

    hostname: str
    ports: str
    require_tls: bool = False
    base_url: str = ""


@define
class WebContext:
    """
    The admin app's dependencies. The stores answer with Deferreds (the
    threaded stores of the gateway, or in tests the synchronous stores
    behind an inline adapter).

    @ivar users: the lists and SMTP+ users (L{smtpgw.userstore.ThreadedUserStore}).
    @ivar admins: admin accounts, tokens and sessions
        (L{smtpgw.admins.ThreadedAdminStore}).
    @ivar alerts: the alert store (L{smtpgw.alerts.SQLiteAlertStore}).
    @ivar control: queue control (L{smtpgw.control.QueueControl}); L{None}
        when the app runs without a queue.
    @ivar stats: daily statistics (L{smtpgw.stats.DailyStats}) or L{None}.
    @ivar metrics: L{smtpgw.metrics.GatewayMetrics} or L{None}.
    @ivar recipients: the recipients store, or L{None}.
    @ivar campaigns: the campaigns store, or L{None}.
    @ivar runner: the campaign runner, poked after changes, or L{None}.
    @ivar health: answers whether the gateway is healthy: a callable
        returning a mapping of checks to booleans.
    """

    users: Any
    admins: Any
    alerts: Any
    clock: IReactorTime
    settings: GatewaySettings
    control: Any = None
    stats: Any = None
    metrics: Any = None
    recipients: Any = None
    campaigns: Any = None
    runner: Any = None
    health: Any = None
    throttle: LoginThrottle = field(factory=LoginThrottle)
