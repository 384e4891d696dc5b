"""
What an authenticated SMTP+ user may do: the cred realm and the
L{IMessageDelivery} avatar it hands to the session.

The avatar holds the business rules of submission, none of the protocol:
whether the envelope sender and the header C{From:} are authorized (and the
alert when they are not), the message's effective priority, the headers the
gateway adds, the envelope, and the hand-over to the queue. The session
(L{smtpgw.session}) frames the bytes and keeps the transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from attrs import define, field, frozen
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.smtp import Address, SMTPBadSender, User
from zope.interface import implementer

from smtpgw.interfaces import Alert, IAlertSink, IMessageQueue
from smtpgw.limits import Limits
from smtpgw.message import MessageAssembler, MessageRejected, make_message_id, received_header
from smtpgw.model import Enforcement, Envelope, Priority, QueueIdGenerator, SmtpUser
from smtpgw.policy import SenderDecision, check_sender, header_from_addresses
from smtpgw.priority import effective_priority, message_priority

__all__ = [
    "GatewayDelivery",
    "GatewayMessage",
    "GatewayRealm",
    "GatewayServices",
    "SessionMind",
    "Transaction",
]

log = Logger()


@frozen
class GatewayServices:
    """
    What every session of a listening factory shares.

    @ivar queue: where accepted messages go.
    @ivar alerts: where sender-domain alerts go.
    @ivar clock: the time source.
    @ivar hostname: this gateway's name, for C{Received:} and C{Message-ID:}.
    @ivar queue_ids: the queue id generator.
    @ivar limits: the session limits (the message size and line length).
    """

    queue: IMessageQueue
    alerts: IAlertSink
    clock: IReactorTime
    hostname: str
    queue_ids: QueueIdGenerator
    limits: Limits


@frozen
class SessionMind:
    """
    The cred "mind" a session logs in with: the services and what the avatar
    must know about the connection.

    @ivar services: the factory's shared services.
    @ivar client_ip: the client's address.
    @ivar tls: whether the connection is encrypted (it stays so: a STARTTLS
        forgets the login).
    """

    services: GatewayServices
    client_ip: str
    tls: bool


@define(eq=False)
class Transaction:
    """
    One mail transaction, from MAIL to the final dot.

    @ivar helo: the HELO/EHLO argument the client gave.
    @ivar sender: the envelope sender (C{""} for the null sender).
    @ivar mt_priority: the C{MT-PRIORITY=} MAIL parameter, if given.
    @ivar recipients: the accepted recipients, in order, without duplicates.
    """

    helo: str
    sender: str
    mt_priority: Priority | None = None
    recipients: list[str] = field(factory=list)


@implementer(IRealm)
class GatewayRealm:
    """
    Turns the L{SmtpUser} that L{smtpgw.checker.SmtpUserChecker} vouches for
    into a L{GatewayDelivery}.

    The realm needs no state of its own: the session logs in with a
    L{SessionMind} that carries the services and the connection's facts.
    """

    def requestAvatar(
        self, avatarId: Any, mind: Any, *interfaces: Any
    ) -> tuple[Any, GatewayDelivery, Callable[[], None]]:
        """
        @param avatarId: the L{SmtpUser} the checker authenticated.
        @param mind: the session's L{SessionMind}.
        @return: C{(IMessageDelivery, avatar, logout)}.
        @raise NotImplementedError: when IMessageDelivery is not asked for,
            or the avatar id or mind are not what the gateway passes.
        """
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("smtpgw only serves IMessageDelivery")
        if not isinstance(avatarId, SmtpUser) or not isinstance(mind, SessionMind):
            raise NotImplementedError("smtpgw needs an SmtpUser and a SessionMind")
        return IMessageDelivery, GatewayDelivery(avatarId, mind), _no_logout


def _no_logout() -> None:
    """
    An avatar holds no resources.
    """


#: A message without a From: field: checked as the null sender, which no
#: user is authorized to use.
_NO_FROM = SenderDecision(allowed=False, reason="message has no From: header")


def _sender_alert(
    *,
    user: SmtpUser,
    decision: SenderDecision,
    where: str,
    client_ip: str,
    now: float,
) -> Alert:
    """
    The C{sender_domain} alert for a sender C{user} is not authorized for.

    @param where: C{"envelope"} (MAIL FROM) or C{"header"} (C{From:}).
    """
    enforced = user.enforcement is Enforcement.ENFORCE
    action = "refused" if enforced else "accepted (monitor mode)"
    return Alert(
        type="sender_domain",
        message=f"{where} sender {action}: {decision.reason}",
        created_at=now,
        list=user.list,
        details={
            "username": user.username,
            "sender": decision.address,
            "domain": decision.domain,
            "where": where,
            "enforcement": user.enforcement.value,
            "client_ip": client_ip,
        },
    )


@implementer(IMessageDelivery)
class GatewayDelivery:
    """
    The avatar of one logged-in SMTP+ user on one connection.

    @ivar user: the user record, as it was at login or at the last
        L{refresh}.
    @ivar checked_at: when L{user} was last read from the store.
    """

    #: Sender decisions remembered per avatar; a session seldom uses more
    #: than two addresses (the envelope sender and the header From, usually
    #: the same), so the memo is small and cleared when it is not.
    _MEMO_SIZE = 16

    def __init__(self, user: SmtpUser, mind: SessionMind) -> None:
        self.user = user
        self._mind = mind
        self._services = mind.services
        self._decisions: dict[str, SenderDecision] = {}
        # The checker read the record just before the realm was asked.
        self.checked_at = mind.services.clock.seconds()

    def refresh(self, user: SmtpUser | None) -> bool:
        """
        Take the user's record as the store has it now.

        @param user: the record read again, or L{None} when it is gone.
        @return: whether the login still stands: the user exists, is
            active, and still has the password hash (a regenerated password
            ends every login made with the old one) and list it logged in
            with. When it does, the new record applies from now on.
        """
        current = self.user
        if (
            user is None
            or not user.active
            or user.password_hash != current.password_hash
            or user.list != current.list
        ):
            return False
        if user != current:
            self.user = user
            self._decisions.clear()
        self.checked_at = self._services.clock.seconds()
        return True

    @property
    def client_ip(self) -> str:
        """
        The address the user logged in from.
        """
        return self._mind.client_ip

    def _sender_allowed(self, address: str, where: str) -> SenderDecision | None:
        """
        Apply the sender policy: alert on a violation.

        @return: the refusing decision when the user's enforcement refuses,
            otherwise C{None}.
        """
        decision = self._decisions.get(address)
        if decision is None:
            if len(self._decisions) >= self._MEMO_SIZE:
                self._decisions.clear()
            decision = self._decisions[address] = check_sender(self.user, address)
        if decision.allowed:
            return None
        return self._violation(decision, where)

    def _violation(self, decision: SenderDecision, where: str) -> SenderDecision | None:
        """
        Alert on (and log) a sender the user may not use.

        @return: C{decision} when the user's enforcement refuses, otherwise
            C{None}.
        """
        services = self._services
        services.alerts.raise_alert(
            _sender_alert(
                user=self.user,
                decision=decision,
                where=where,
                client_ip=self._mind.client_ip,
                now=services.clock.seconds(),
            )
        )
        log.info(
            "{where} sender not authorized for {username}: {reason}",
            where=where,
            username=self.user.username,
            reason=decision.reason,
        )
        if self.user.enforcement is Enforcement.ENFORCE:
            return decision
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: Address) -> Address:
        """
        Check the envelope sender against the user's authorized domains and
        senders.

        @return: C{origin} when it passes, or when it does not and the user
            is in monitor mode (an alert is raised either way).
        @raise SMTPBadSender: C{550 5.7.1} naming the sender and why.
        """
        refused = self._sender_allowed(str(origin), "envelope")
        if refused is not None:
            raise SMTPBadSender(origin, 550, "5.7.1 " + refused.reason)
        return origin

    def validateTo(self, user: User) -> Callable[[], GatewayMessage]:
        """
        Accept a recipient: the gateway relays to any address.

        Every recipient of a transaction is given the same message factory,
        bound to the session's transaction, so that the message is assembled
        once however many recipients it has; the session calls it once.

        @param user: the recipient; C{user.protocol.transaction} is the
            L{Transaction} it joins.
        @return: the transaction's message factory.
        """
        return functools.partial(self.open_message, user.protocol.transaction)

    def receivedHeader(
        self, helo: tuple[bytes, bytes], origin: Address, recipients: list[User]
    ) -> bytes:
        """
        The gateway adds its C{Received:} field when the message is complete
        (it names the queue id); nothing is prepended at DATA.
        """
        return b""

    def open_message(self, transaction: Transaction) -> GatewayMessage:
        """
        Start receiving the message of C{transaction}.
        """
        limits = self._services.limits
        assembler = MessageAssembler(
            max_size=limits.max_size, max_line_length=limits.max_data_line_length
        )
        return GatewayMessage(self, transaction, assembler)

    def _header_from_refusal(self, headers: list[tuple[str, str]]) -> MessageRejected | None:
        refusal = None
        seen_from = False
        for name, value in headers:
            if name.lower() != "from":
                continue
            seen_from = True
            # A From: with nothing readable in it checks as the null sender,
            # so junk fails closed.
            for address in header_from_addresses(value) or [""]:
                refused = self._sender_allowed(address, "header")
                if refused is not None and refusal is None:
                    refusal = MessageRejected(550, "5.7.1", "Header From: " + refused.reason)
        if not seen_from and self._violation(_NO_FROM, "header") is not None:
            # Sender: or Resent-From: alone must not stand in for From:, the
            # address recipients are shown (RFC 5322 3.6.2 requires one).
            refusal = MessageRejected(550, "5.7.1", "Message has no From: header")
        return refusal

    def accept(self, transaction: Transaction, assembler: MessageAssembler) -> Deferred[str]:
        """
        Check, complete and queue a fully received message.

        @return: a L{Deferred} firing with the queue id once the queue has
            made the message durable; failing with L{MessageRejected} (header
            sender refused) or L{smtpgw.interfaces.JournalUnavailable}.
        """
        headers = assembler.headers
        refusal = self._header_from_refusal(headers)
        if refusal is not None:
            return fail(refusal)
        services = self._services
        user = self.user
        now = services.clock.seconds()
        queue_id = services.queue_ids.next(now)
        priority = effective_priority(
            user.priority, message_priority(headers, transaction.mt_priority)
        )
        recipients = transaction.recipients
        received = received_header(
            from_helo=transaction.helo,
            client_ip=self._mind.client_ip,
            by_host=services.hostname,
            queue_id=queue_id,
            username=user.username,
            tls=self._mind.tls,
            when=now,
            recipient=recipients[0] if len(recipients) == 1 else None,
        )
        message_id = None
        if not assembler.has_message_id:
            message_id = make_message_id(queue_id, services.hostname)
        try:
            body = assembler.finish(received=received, message_id=message_id, priority=priority)
        except MessageRejected as rejection:
            return fail(rejection)
        envelope = Envelope(
            queue_id=queue_id,
            list=user.list,
            username=user.username,
            sender=transaction.sender,
            recipients=tuple(recipients),
            priority=priority,
            accepted_at=now,
            client_ip=self._mind.client_ip,
            size=len(body),
        )
        submitted: Deferred[Any] = services.queue.submit(envelope, body)
        return submitted.addCallback(lambda _: queue_id)


@implementer(IMessageSMTP)
class GatewayMessage:
    """
    The one message sink of a transaction, whatever its number of recipients.

    @ivar lineReceived: takes one DATA line, without CRLF and un-dot-stuffed;
        raises L{MessageRejected}. It is the assembler's own method, so the
        per-line path has no extra call.
    """

    lineReceived: Callable[[bytes], None]

    def __init__(
        self, delivery: GatewayDelivery, transaction: Transaction, assembler: MessageAssembler
    ) -> None:
        self._delivery = delivery
        self._transaction = transaction
        self.assembler = assembler
        self.lineReceived = assembler.line

    def eomReceived(self) -> Deferred[str]:
        """
        The final dot arrived: see L{GatewayDelivery.accept}.
        """
        return self._delivery.accept(self._transaction, self.assembler)

    def connectionLost(self) -> None:
        """
        The message will not be completed: nothing of it is queued, and its
        bytes go with the last reference to it (the session drops it).
        """
