"""
C{smtpgw-admin}: manage a data directory from scripts and the shell, also
while the gateway runs.

    smtpgw-admin [--data-dir DIR] [--json] GROUP COMMAND [ARGS] [--json]

C{--data-dir} defaults to C{./smtpgw-data}. With C{--json} (right after the
global options, or at the end of the line) a command prints one JSON
document with the field names of the product's section 1; password hashes
are never printed, and a password only when it was just generated.

Exit status: 0 on success; 1 when the command cannot be done (no such user,
list exists, unusable database); 2 for bad input (unknown command, bad
option, invalid value). Errors are one line on standard error, and a
failed command changes nothing.

The C{queue} commands talk to the running gateway over its control socket,
C{DATA_DIR/control.sock} (see L{smtpgw.control}), as the gateway's user or
root; when no gateway answers they exit 1 and say so.

The environment variable C{SMTPGW_BCRYPT_ROUNDS} (default 12, 4 to 31) sets
the bcrypt cost of new password hashes; tests set it to 4. It is not in
C{--help} on purpose: lowering it weakens every new password.

Adding a command group: write a function that
takes the subparsers object, adds the group's parser and its commands with
L{add_command}, and append it to L{COMMAND_GROUPS}. A command's handler gets
the parsed arguments and a L{Context}, and returns an L{Output}, or raises
L{CommandError}.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

from attrs import define, frozen
from twisted.internet.interfaces import IReactorTime

from smtpgw.admins import (
    Admin,
    ApiToken,
    SQLiteAdminStore,
    admin_document,
    token_document,
    validate_admin_name,
    validate_token_name,
)
from smtpgw.campaigns import (
    MAX_BODY_LENGTH,
    Campaign,
    CampaignState,
    SQLiteCampaignStore,
    campaign_document,
    parse_send_at,
)
from smtpgw.control import (
    BadArgument,
    ControlClient,
    ControlError,
    control_socket_path,
)
from smtpgw.database import StoreError, database_path
from smtpgw.model import Enforcement, SmtpUser
from smtpgw.passwords import DEFAULT_ROUNDS, MAX_ROUNDS, MIN_ROUNDS
from smtpgw.queueinfo import (
    DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
    QUEUE_STATES,
    MessageChange,
    QueueFilter,
    QueueRow,
    QueueStatus,
    change_document,
    iso8601,
    listing_document,
    parse_state,
    status_document,
    why_document,
)
from smtpgw.recipients import (
    MAX_IMPORT_BYTES,
    MAX_PAGE,
    CsvRefused,
    RecipientStatus,
    import_document,
    parse_recipients_csv,
    recipient_document,
)
from smtpgw.userstore import (
    UNSET,
    SQLiteUserStore,
    Unset,
    list_document,
    user_document,
)
from smtpgw.validation import (
    ValidationError,
    parse_domains,
    parse_senders,
    validate_list_name,
    validate_notes,
    validate_priority,
)

__all__ = [
    "COMMAND_GROUPS",
    "DEFAULT_DATA_DIR",
    "ROUNDS_ENVIRONMENT_VARIABLE",
    "CommandError",
    "Context",
    "Output",
    "UsageError",
    "add_admin_commands",
    "add_campaign_commands",
    "add_command",
    "add_queue_commands",
    "add_recipient_commands",
    "add_token_commands",
    "build_parser",
    "main",
]

PROG: Final = "smtpgw-admin"
DEFAULT_DATA_DIR: Final = "./smtpgw-data"
ROUNDS_ENVIRONMENT_VARIABLE: Final = "SMTPGW_BCRYPT_ROUNDS"

T = TypeVar("T")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

_LATEST_SEND_AT: Final = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()

# Where each field of a ValidationError is entered on the command line.
_OPTION_OF_FIELD: Final = {
    "name": "NAME",
    "priority": "--priority",
    "authorized_domains": "--domains",
    "authorized_senders": "--senders",
    "notes": "--notes",
    "enforcement": "--enforce/--monitor",
    "active": "--active/--inactive",
    "subject": "--subject",
    "text": "--text",
    "html": "--html",
    "sender": "--sender",
    "send_at": "--send-at",
}


class CommandError(Exception):
    """
    The command cannot be done; the message is the one line shown.

    @ivar exit_status: the process exit status.
    """

    exit_status = EXIT_FAILED


class UsageError(CommandError):
    """
    The command line is wrong.
    """

    exit_status = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """
    An argument parser whose errors are exceptions, so that L{main} reports
    them on one line and returns instead of exiting.
    """

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{command}: {message}" if command else message)


@frozen
class Output:
    """
    What a command prints: one JSON document with C{--json}, else text.
    """

    document: Any
    text: str


@define
class Context:
    """
    What commands share: the data directory, the clock, the bcrypt cost,
    and the user and admin stores, opened on first use.
    """

    data_dir: Path
    clock: IReactorTime
    rounds: int
    _store: SQLiteUserStore | None = None
    _admin_store: SQLiteAdminStore | None = None
    _campaign_store: SQLiteCampaignStore | None = None

    def _make_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise CommandError(
                f"cannot create data directory {self.data_dir}: {e.strerror}"
            ) from e

    def user_store(self, *, create: bool = False) -> SQLiteUserStore:
        """
        The user store of the data directory.

        @param create: make the data directory (mode 0700) and the database
            when missing; only commands that create something do.
        @raise StoreError: when the database cannot be used.
        """
        if self._store is None:
            if create:
                self._make_data_dir()
            self._store = SQLiteUserStore.open(
                database_path(self.data_dir), self.clock, rounds=self.rounds, create=create
            )
        return self._store

    def admin_store(self, *, create: bool = False) -> SQLiteAdminStore:
        """
        The admin store (admins, API tokens) of the data directory.

        @param create: as for L{user_store}.
        @raise StoreError: when the database cannot be used.
        """
        if self._admin_store is None:
            if create:
                self._make_data_dir()
            self._admin_store = SQLiteAdminStore.open(
                database_path(self.data_dir), self.clock, rounds=self.rounds, create=create
            )
        return self._admin_store

    def campaign_store(self) -> SQLiteCampaignStore:
        """
        The store of console sends (and, as its C{recipients}, of the
        lists' recipients) of the data directory.

        @raise StoreError: when the database cannot be used.
        """
        if self._campaign_store is None:
            self._campaign_store = SQLiteCampaignStore.open(
                database_path(self.data_dir), self.clock, create=False
            )
        return self._campaign_store

    def close(self) -> None:
        """
        Close what was opened.
        """
        if self._campaign_store is not None:
            self._campaign_store.close()
            self._campaign_store = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._admin_store is not None:
            self._admin_store.close()
            self._admin_store = None


Handler = Callable[[argparse.Namespace, Context], Output]


def add_command(
    subparsers: argparse._SubParsersAction[_Parser],
    name: str,
    handler: Handler,
    help: str,
) -> _Parser:
    """
    Add a command: its parser, which also takes C{--json}, runs C{handler}.

    @return: the parser, for the command's own arguments.
    """
    parser = subparsers.add_parser(name, help=help, description=help)
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print one JSON document",
    )
    parser.set_defaults(handler=handler)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _validation_message(error: ValidationError) -> str:
    return f"{_OPTION_OF_FIELD.get(error.field, error.field)}: {error.message}"


# --- list commands ------------------------------------------------------------


def _list_add(args: argparse.Namespace, context: Context) -> Output:
    validate_list_name(args.name)
    created = context.user_store(create=True).create_list(args.name)
    return Output(list_document(created, 0), f"created list {created.name}")


def _list_show(args: argparse.Namespace, context: Context) -> Output:
    store = context.user_store()
    counts = store.user_counts()
    lists = store.lists()
    documents = [list_document(m, counts.get(m.name, 0)) for m in lists]
    if not documents:
        return Output({"lists": []}, "no lists")
    rows = [("NAME", "USERS", "CREATED")] + [
        (d["name"], str(d["users"]), d["created_at"]) for d in documents
    ]
    return Output({"lists": documents}, _table(rows))


def add_list_commands(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """
    C{list add NAME} and C{list show}.
    """
    group = subparsers.add_parser("list", help="mailing lists", description="mailing lists")
    commands = group.add_subparsers(dest="list_command", metavar="COMMAND", required=True)
    add = add_command(commands, "add", _list_add, "create a list")
    add.add_argument("name", metavar="NAME", help="lower-case letters, digits, '.', '_', '-'")
    add_command(commands, "show", _list_show, "show every list and its number of SMTP+ users")


# --- user commands ------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _user_text(user: SmtpUser, password: str | None = None) -> str:
    document = user_document(user, password)
    lines = [f"username: {user.username}"]
    if password is not None:
        lines.append(f"password: {password}")
    lines += [
        f"list: {user.list}",
        f"active: {'yes' if user.active else 'no'}",
        f"priority: {int(user.priority)}",
        f"enforcement: {user.enforcement.value}",
        f"authorized_domains: {';'.join(user.authorized_domains) or '(none)'}",
        f"authorized_senders: {';'.join(user.authorized_senders) or '(none)'}",
        f"notes: {_one_line(user.notes)}",
        f"created_at: {document['created_at']}",
        f"last_used_at: {document['last_used_at'] or 'never'}",
        f"last_used_ip: {user.last_used_ip or '-'}",
    ]
    if not user.authorized_domains and not user.authorized_senders:
        lines.append("note: no sender is authorized until --domains or --senders is set")
    if password is not None:
        lines.append("note: the password is shown only this once; it is stored only as a hash")
    return "\n".join(lines)


def _add_user_fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--priority", metavar="N", help="1 (very high) to 5 (very low)")
    parser.add_argument(
        "--domains", metavar="LIST", help="authorized sender domains, ';'-separated"
    )
    parser.add_argument(
        "--senders", metavar="LIST", help="authorized sender addresses, ';'-separated"
    )
    parser.add_argument("--notes", metavar="TEXT", help="a memo for admins")


def _user_fields(args: argparse.Namespace) -> dict[str, Any]:
    """
    The user fields given on the command line, validated (before anything
    is opened, so that bad input changes nothing).
    """
    fields: dict[str, Any] = {}
    if args.priority is not None:
        fields["priority"] = validate_priority(args.priority)
    if args.domains is not None:
        fields["domains"] = parse_domains(args.domains)
    if args.senders is not None:
        fields["senders"] = parse_senders(args.senders)
    if args.notes is not None:
        fields["notes"] = validate_notes(args.notes)
    return fields


def _user_add(args: argparse.Namespace, context: Context) -> Output:
    fields = _user_fields(args)
    user, password = context.user_store().create_user(
        args.list,
        active=not args.inactive,
        enforcement=Enforcement.MONITOR if args.monitor else Enforcement.ENFORCE,
        **fields,
    )
    return Output(user_document(user, password), _user_text(user, password))


def _user_list(args: argparse.Namespace, context: Context) -> Output:
    users = context.user_store().users(args.list)
    documents = [user_document(user) for user in users]
    if not users:
        return Output({"users": []}, "no users")
    rows = [("USERNAME", "LIST", "ACTIVE", "PRIORITY", "ENFORCEMENT", "LAST USED")] + [
        (
            d["username"],
            d["list"],
            "yes" if d["active"] else "no",
            str(d["priority"]),
            d["enforcement"],
            d["last_used_at"] or "never",
        )
        for d in documents
    ]
    return Output({"users": documents}, _table(rows))


def _no_such_user(username: str) -> CommandError:
    return CommandError(f"no SMTP+ user named {username!r}")


def _user_show(args: argparse.Namespace, context: Context) -> Output:
    user = context.user_store().get_user(args.username)
    if user is None:
        raise _no_such_user(args.username)
    return Output(user_document(user), _user_text(user))


def _user_set(args: argparse.Namespace, context: Context) -> Output:
    fields = _user_fields(args)
    active: bool | Unset = UNSET if args.active is None else args.active
    enforcement: Enforcement | Unset = UNSET if args.enforcement is None else args.enforcement
    list_name: str | Unset = UNSET if args.list is None else args.list
    unchanged = [active, enforcement, list_name]
    if not fields and all(isinstance(value, Unset) for value in unchanged):
        raise UsageError(
            "user set: nothing to change: give --list, --priority, --domains, "
            "--senders, --notes, --active/--inactive or --enforce/--monitor"
        )
    user = context.user_store().update_user(
        args.username, list=list_name, active=active, enforcement=enforcement, **fields
    )
    return Output(user_document(user), _user_text(user))


def _user_regenerate_password(args: argparse.Namespace, context: Context) -> Output:
    password = context.user_store().regenerate_password(args.username)
    return Output(
        {"username": args.username, "password": password},
        f"username: {args.username}\npassword: {password}\n"
        "note: the password is shown only this once; the old one no longer works",
    )


def _user_delete(args: argparse.Namespace, context: Context) -> Output:
    context.user_store().delete_user(args.username)
    return Output(
        {"username": args.username, "deleted": True}, f"deleted SMTP+ user {args.username}"
    )


def add_user_commands(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """
    C{user add}, C{list}, C{show}, C{set}, C{regenerate-password}, C{delete}.
    """
    group = subparsers.add_parser("user", help="SMTP+ users", description="SMTP+ users")
    commands = group.add_subparsers(dest="user_command", metavar="COMMAND", required=True)

    add = add_command(
        commands, "add", _user_add, "create an SMTP+ user; prints its password, once"
    )
    add.add_argument("--list", required=True, metavar="NAME", help="the list it relays for")
    _add_user_fields(add)
    add.add_argument("--inactive", action="store_true", help="create it unable to log in")
    add.add_argument(
        "--monitor",
        action="store_true",
        help="accept unauthorized senders (still raising alerts) instead of refusing them",
    )

    listing = add_command(commands, "list", _user_list, "show the SMTP+ users")
    listing.add_argument("--list", metavar="NAME", help="only the users of this list")

    show = add_command(commands, "show", _user_show, "show one SMTP+ user")
    show.add_argument("username", metavar="USERNAME")

    change = add_command(commands, "set", _user_set, "change fields of an SMTP+ user")
    change.add_argument("username", metavar="USERNAME")
    change.add_argument("--list", metavar="NAME", help="move it to this list")
    _add_user_fields(change)
    activity = change.add_mutually_exclusive_group()
    activity.add_argument(
        "--active", dest="active", action="store_const", const=True, help="let it log in"
    )
    activity.add_argument(
        "--inactive", dest="active", action="store_const", const=False, help="stop its logins"
    )
    mode = change.add_mutually_exclusive_group()
    mode.add_argument(
        "--enforce",
        dest="enforcement",
        action="store_const",
        const=Enforcement.ENFORCE,
        help="refuse unauthorized senders",
    )
    mode.add_argument(
        "--monitor",
        dest="enforcement",
        action="store_const",
        const=Enforcement.MONITOR,
        help="accept unauthorized senders, still raising alerts",
    )

    regenerate = add_command(
        commands,
        "regenerate-password",
        _user_regenerate_password,
        "give an SMTP+ user a new password; prints it, once",
    )
    regenerate.add_argument("username", metavar="USERNAME")

    delete = add_command(commands, "delete", _user_delete, "delete an SMTP+ user")
    delete.add_argument("username", metavar="USERNAME")


# --- queue commands -----------------------------------------------------------


def _control_client(context: Context) -> ControlClient:
    return ControlClient(control_socket_path(context.data_dir))


def _ask_gateway(context: Context, request: Callable[[ControlClient], T]) -> T:
    """
    Run one request against the running gateway's control socket.
    """
    with _control_client(context) as client:
        try:
            return request(client)
        except BadArgument as e:
            raise UsageError(str(e)) from None
        except ControlError as e:
            raise CommandError(str(e)) from None


def _queue_id_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue_id", metavar="ID", help="the message's queue id")


def _status_text(status: QueueStatus) -> str:
    counts = ", ".join(f"{status.counts.get(s, 0)} {s.value}" for s in QUEUE_STATES)
    state = "stopped by an admin" if status.paused else "running"
    return f"queue {state}: {counts}; deliveries under way: {status.in_flight}"


def _time_text(seconds: float | None) -> str:
    return iso8601(seconds) or "-"


def _queue_list(args: argparse.Namespace, context: Context) -> Output:
    try:
        state = None if args.state is None else parse_state(args.state)
    except ValueError as e:
        raise UsageError(f"--state: {e}") from None
    priority = None if args.priority is None else validate_priority(args.priority)
    if not 1 <= args.limit <= MAX_LIST_LIMIT:
        raise UsageError(f"--limit must be 1 to {MAX_LIST_LIMIT}, not {args.limit}")
    queue_filter = QueueFilter(list=args.list, username=args.user, priority=priority, state=state)
    listing = _ask_gateway(
        context, lambda client: client.listing(queue_filter, args.after, args.limit)
    )
    lines = [_status_text(listing.status)]
    if listing.rows:
        rows = [
            (
                "QUEUE ID",
                "LIST",
                "USER",
                "PRI",
                "STATE",
                "TRIES",
                "ACCEPTED",
                "NEXT ATTEMPT",
                "ESTIMATED SEND",
                "SENDER",
                "RECIPIENTS",
            ),
        ] + [
            (
                row.queue_id,
                row.list,
                row.username or "?",
                str(int(row.priority)),
                row.state.value,
                str(row.attempts),
                _time_text(row.accepted_at),
                _time_text(row.next_attempt_at),
                _time_text(row.estimated_send_at),
                row.sender if row.sender is not None else "?",
                _recipients_text(row),
            )
            for row in listing.rows
        ]
        lines.append(_table(rows))
    else:
        lines.append("no messages match")
    if listing.next_after is not None:
        lines.append(f"more: list on with --after {listing.next_after}")
    return Output(listing_document(listing), "\n".join(lines))


def _recipients_text(row: QueueRow) -> str:
    shown = ",".join(row.recipients) or "-"
    hidden = row.recipient_count - len(row.recipients)
    return f"{shown} (+{hidden} more)" if hidden > 0 else shown


def _queue_stop(args: argparse.Namespace, context: Context) -> Output:
    status = _ask_gateway(context, lambda client: client.stop())
    return Output(
        status_document(status),
        f"{_status_text(status)}\nno new delivery starts until 'queue start'; "
        "mail is still accepted and kept",
    )


def _queue_start(args: argparse.Namespace, context: Context) -> Output:
    status = _ask_gateway(context, lambda client: client.start())
    return Output(status_document(status), _status_text(status))


def _change_output(change: MessageChange) -> Output:
    return Output(
        change_document(change),
        f"{change.queue_id}: {change.state.value}, priority {int(change.priority)}",
    )


def _queue_hold(args: argparse.Namespace, context: Context) -> Output:
    return _change_output(_ask_gateway(context, lambda client: client.hold(args.queue_id)))


def _queue_release(args: argparse.Namespace, context: Context) -> Output:
    return _change_output(_ask_gateway(context, lambda client: client.release(args.queue_id)))


def _queue_cancel(args: argparse.Namespace, context: Context) -> Output:
    return _change_output(_ask_gateway(context, lambda client: client.cancel(args.queue_id)))


def _queue_priority(args: argparse.Namespace, context: Context) -> Output:
    try:
        priority = validate_priority(args.priority)
    except ValidationError as e:
        raise UsageError(f"N: {e.message}") from None
    return _change_output(
        _ask_gateway(context, lambda client: client.reprioritize(args.queue_id, int(priority)))
    )


def _queue_why(args: argparse.Namespace, context: Context) -> Output:
    why = _ask_gateway(context, lambda client: client.why(args.queue_id))
    lines = [
        f"queue_id: {why.queue_id}",
        f"list: {why.list}",
        f"state: {why.state.value}",
        f"priority: {int(why.priority)}",
        f"attempts: {why.attempts}",
        f"position: {'-' if why.position is None else why.position}",
        f"waiting for: {why.reason}",
        f"estimated send: {_time_text(why.estimated_send_at)}",
    ]
    if why.next_attempt_at is not None:
        lines.insert(5, f"next_attempt_at: {_time_text(why.next_attempt_at)}")
    return Output(why_document(why), "\n".join(lines))


def add_queue_commands(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """
    C{queue list}, C{stop}, C{start}, C{hold}, C{release}, C{cancel},
    C{priority}, C{why}: they talk to the running gateway over its control
    socket, C{<data-dir>/control.sock}.
    """
    group = subparsers.add_parser(
        "queue",
        help="the running gateway's send queue",
        description="Control the running gateway's send queue (through "
        "DATA_DIR/control.sock; run as the gateway's user or root).",
    )
    commands = group.add_subparsers(dest="queue_command", metavar="COMMAND", required=True)

    listing = add_command(
        commands,
        "list",
        _queue_list,
        "list the messages in the queue (queued, sending, deferred, held), oldest first",
    )
    listing.add_argument("--list", metavar="NAME", help="only the messages of this list")
    listing.add_argument("--user", metavar="USERNAME", help="only this SMTP+ user's messages")
    listing.add_argument("--priority", metavar="N", help="only messages of this priority")
    listing.add_argument(
        "--state",
        metavar="STATE",
        help="queued, sending, deferred or held (delivered, bounced and cancelled "
        "messages have left the queue)",
    )
    listing.add_argument(
        "--limit",
        metavar="N",
        type=int,
        default=DEFAULT_LIST_LIMIT,
        help=f"at most N messages (default {DEFAULT_LIST_LIMIT}, at most {MAX_LIST_LIMIT})",
    )
    listing.add_argument("--after", metavar="ID", help="only messages after this queue id")

    add_command(
        commands,
        "stop",
        _queue_stop,
        "stop sending (deliveries under way finish; mail is still accepted and kept)",
    )
    add_command(commands, "start", _queue_start, "start sending again")
    hold = add_command(commands, "hold", _queue_hold, "keep a message from being sent")
    _queue_id_argument(hold)
    release = add_command(
        commands, "release", _queue_release, "let a held or deferred message go now"
    )
    _queue_id_argument(release)
    cancel = add_command(commands, "cancel", _queue_cancel, "drop a message, never sending it")
    _queue_id_argument(cancel)
    priority = add_command(commands, "priority", _queue_priority, "change a message's priority")
    _queue_id_argument(priority)
    priority.add_argument("priority", metavar="N", help="1 (very high) to 5 (very low)")
    why = add_command(
        commands,
        "why",
        _queue_why,
        "why a message waits: position, priority, throttle, estimated send time",
    )
    _queue_id_argument(why)


# --- admin and token commands ---------------------------------------------------

_SHOWN_ONCE: Final = "is shown only this once; it is stored only as a hash"


def _admin_add(args: argparse.Namespace, context: Context) -> Output:
    validate_admin_name(args.name)
    store = context.admin_store(create=True)
    password = store.create_admin(args.name)
    (admin,) = [a for a in store.admins() if a.name == args.name]
    return Output(
        admin_document(admin, password),
        f"name: {admin.name}\npassword: {password}\nnote: the password {_SHOWN_ONCE}",
    )


def _admin_list(args: argparse.Namespace, context: Context) -> Output:
    listed: list[Admin] = context.admin_store().admins()
    documents = [admin_document(admin) for admin in listed]
    if not documents:
        return Output({"admins": []}, "no admins")
    rows = [("NAME", "CREATED", "LAST LOGIN")] + [
        (d["name"], d["created_at"], d["last_login_at"] or "never") for d in documents
    ]
    return Output({"admins": documents}, _table(rows))


def _admin_delete(args: argparse.Namespace, context: Context) -> Output:
    context.admin_store().delete_admin(args.name)
    return Output({"name": args.name, "deleted": True}, f"deleted admin {args.name}")


def _admin_password(args: argparse.Namespace, context: Context) -> Output:
    password = context.admin_store().set_admin_password(args.name)
    return Output(
        {"name": args.name, "password": password},
        f"name: {args.name}\npassword: {password}\nnote: the password {_SHOWN_ONCE}; "
        "the old one no longer works and its sessions have ended",
    )


def add_admin_commands(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """
    C{admin add NAME}, C{list}, C{delete NAME}, C{password NAME}: the
    accounts of the admin web pages.
    """
    group = subparsers.add_parser(
        "admin", help="admin web page accounts", description="admin web page accounts"
    )
    commands = group.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)
    add = add_command(commands, "add", _admin_add, "create an admin; prints its password, once")
    add.add_argument("name", metavar="NAME", help="letters, digits, '.', '_', '@', '-'")
    add_command(commands, "list", _admin_list, "show the admins")
    delete = add_command(commands, "delete", _admin_delete, "delete an admin")
    delete.add_argument("name", metavar="NAME")
    password = add_command(
        commands,
        "password",
        _admin_password,
        "give an admin a new password, ending its sessions; prints it, once",
    )
    password.add_argument("name", metavar="NAME")


def _token_text(token: ApiToken, secret: str | None = None) -> str:
    document = token_document(token)
    lines = [f"id: {token.id}", f"name: {token.name}"]
    if secret is not None:
        lines.append(f"token: {secret}")
    lines += [
        f"created_by: {token.created_by or '-'}",
        f"created_at: {document['created_at']}",
        f"last_used_at: {document['last_used_at'] or 'never'}",
    ]
    if secret is not None:
        lines.append(f"note: the token {_SHOWN_ONCE}")
    return "\n".join(lines)


def _token_add(args: argparse.Namespace, context: Context) -> Output:
    name = validate_token_name(args.name)
    token, secret = context.admin_store(create=True).create_token(name, None)
    return Output(token_document(token, secret), _token_text(token, secret))


def _token_list(args: argparse.Namespace, context: Context) -> Output:
    documents = [token_document(token) for token in context.admin_store().tokens()]
    if not documents:
        return Output({"tokens": []}, "no API tokens")
    rows = [("ID", "NAME", "CREATED BY", "CREATED", "LAST USED")] + [
        (
            str(d["id"]),
            d["name"],
            d["created_by"] or "-",
            d["created_at"],
            d["last_used_at"] or "never",
        )
        for d in documents
    ]
    return Output({"tokens": documents}, _table(rows))


def _token_delete(args: argparse.Namespace, context: Context) -> Output:
    context.admin_store().delete_token(args.id)
    return Output({"id": args.id, "deleted": True}, f"deleted API token {args.id}")


def add_token_commands(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """
    C{token add NAME}, C{list}, C{delete ID}: bearer tokens of the JSON API.
    """
    group = subparsers.add_parser(
        "token", help="JSON API tokens", description="bearer tokens of the JSON API"
    )
    commands = group.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    add = add_command(commands, "add", _token_add, "create an API token; prints the token, once")
    add.add_argument("name", metavar="NAME", help="what it is for (up to 64 characters)")
    add_command(commands, "list", _token_list, "show the API tokens (never the tokens themselves)")
    delete = add_command(commands, "delete", _token_delete, "delete an API token")
    delete.add_argument("id", metavar="ID", type=int, help="its id, from 'token list'")


# --- recipients and campaign commands ----------------------------------------------

#: Bad rows named in the one-line error of an import that changed nothing.
_ERRORS_SHOWN: Final = 5


def _read_input(path: str, limit: int) -> bytes:
    """
    The bytes of a file (C{-}: standard input), at most C{limit} and one
    more (so that a parser can say it is too large).
    """
    try:
        if path == "-":
            return sys.stdin.buffer.read(limit + 1)
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None


# A body of MAX_BODY_LENGTH characters is at most this many bytes of UTF-8,
# with a byte order mark: reading this much never cuts a body that fits.
_MAX_BODY_BYTES: Final = 4 * MAX_BODY_LENGTH + len(codecs.BOM_UTF8)


def _read_text(path: str, option: str) -> str:
    """
    A body from a file (C{-}: standard input), whole or refused.

    @raise UsageError: the file is not UTF-8 text or is longer than
        L{MAX_BODY_LENGTH} characters.
    """
    data = _read_input(path, _MAX_BODY_BYTES)
    too_long = f"{option}: {path} is longer than the {MAX_BODY_LENGTH} characters allowed"
    if len(data) > _MAX_BODY_BYTES:
        raise UsageError(too_long)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{option}: {path} is not UTF-8 text") from None
    if len(text) > MAX_BODY_LENGTH:
        raise UsageError(f"{too_long} ({len(text)})")
    return text


def _utf8(value: str | None, option: str) -> str | None:
    """
    An argument as given, refused when it is not UTF-8: bytes that are
    not come from the command line as lone surrogates, which can neither
    be stored nor sent.

    @raise UsageError: naming the option.
    """
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(
                f"{option}: not valid UTF-8 text (check the terminal's encoding)"
            ) from None
    return value


def _recipients_import(args: argparse.Namespace, context: Context) -> Output:
    data = _read_input(args.file, MAX_IMPORT_BYTES)
    try:
        parsed = parse_recipients_csv(data)
    except CsvRefused as e:
        raise UsageError(f"{args.file}: {e}") from None
    result = context.campaign_store().recipients.import_recipients(
        args.list, parsed, valid_only=args.valid_only
    )
    if not result.applied:
        shown = "; ".join(f"line {e.line}: {e.message}" for e in result.errors[:_ERRORS_SHOWN])
        more = len(result.errors) - _ERRORS_SHOWN
        raise UsageError(
            f"{len(result.errors)} bad row(s), nothing imported (--valid-only imports the "
            f"{len(parsed.rows)} good one(s)): {shown}"
            + (f"; and {more} more" if more > 0 else "")
        )
    lines = [
        f"imported {result.imported} recipient(s) into list {args.list}: "
        f"{result.added} added, {result.updated} updated"
    ]
    lines += [f"line {e.line}: {e.message}" for e in result.errors]
    if result.errors:
        lines.append(f"{len(result.errors)} bad row(s) left out")
    return Output(import_document(result), "\n".join(lines))


def _recipients_list(args: argparse.Namespace, context: Context) -> Output:
    if not 1 <= args.limit <= MAX_PAGE:
        raise UsageError(f"--limit must be 1 to {MAX_PAGE}, not {args.limit}")
    status = None
    if args.status is not None:
        try:
            status = RecipientStatus(args.status)
        except ValueError:
            raise UsageError(
                f"--status: {args.status!r} is not subscribed, unsubscribed or bounced"
            ) from None
    store = context.campaign_store().recipients
    page = store.recipients(args.list, args.after, args.limit, status)
    counts = store.counts(args.list)
    next_after = page[-1].id if len(page) == args.limit else None
    document = {
        "recipients": [recipient_document(r) for r in page],
        "counts": {s.value: n for s, n in counts.items()},
        "next_after": next_after,
    }
    lines = [", ".join(f"{n} {s.value}" for s, n in counts.items())]
    if page:
        rows = [("ID", "EMAIL", "STATUS", "FIELDS")] + [
            (
                str(r.id),
                r.email,
                r.status.value,
                _one_line(", ".join(f"{k}={v}" for k, v in r.fields.items()))[:60],
            )
            for r in page
        ]
        lines.append(_table(rows))
    else:
        lines.append("no recipients match")
    if next_after is not None:
        lines.append(f"more: list on with --after {next_after}")
    return Output(document, "\n".join(lines))


def add_recipient_commands(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """
    C{recipients import --list NAME FILE [--valid-only]} and
    C{recipients list --list NAME}.
    """
    group = subparsers.add_parser(
        "recipients", help="the recipients of lists", description="the recipients of lists"
    )
    commands = group.add_subparsers(dest="recipients_command", metavar="COMMAND", required=True)
    imports = add_command(
        commands,
        "import",
        _recipients_import,
        "import recipients from a CSV file (a header row with an 'email' column; the other "
        "columns are merge fields); with bad rows nothing is imported unless --valid-only",
    )
    imports.add_argument("--list", required=True, metavar="NAME", help="the list")
    imports.add_argument("file", metavar="FILE", help="the CSV file, UTF-8 ('-': standard input)")
    imports.add_argument(
        "--valid-only", action="store_true", help="import the good rows even if some are bad"
    )
    listing = add_command(commands, "list", _recipients_list, "show a list's recipients")
    listing.add_argument("--list", required=True, metavar="NAME", help="the list")
    listing.add_argument("--status", metavar="STATUS", help="subscribed, unsubscribed or bounced")
    listing.add_argument("--after", metavar="ID", type=int, default=0, help="only ids after ID")
    listing.add_argument(
        "--limit",
        metavar="N",
        type=int,
        default=100,
        help=f"at most N (default 100, {MAX_PAGE} most)",
    )


def _campaign_text(campaign: Campaign, now: float) -> str:
    document = campaign_document(campaign, now)
    lines = [
        f"id: {campaign.id}",
        f"list: {campaign.list}",
        f"subject: {_one_line(campaign.subject)}",
        f"sender: {campaign.sender}",
        f"priority: {int(campaign.priority)}",
        f"state: {campaign.state.value}",
    ]
    if document["paused_reason"]:
        lines.append(f"paused_reason: {document['paused_reason']}")
    total = "?" if campaign.total is None else str(campaign.total)
    lines += [
        f"send_at: {document['send_at'] or 'now'}",
        f"progress: {campaign.sent}/{total} sent, {campaign.delivered} delivered, "
        f"{campaign.bounced} bounced, {campaign.deferred} deferred, {campaign.in_doubt} in doubt",
        f"rate: {document['rate']}/s",
        f"eta: {document['eta'] or '-'}",
        f"created_at: {document['created_at']}",
        f"started_at: {document['started_at'] or '-'}",
        f"finished_at: {document['finished_at'] or '-'}",
    ]
    return "\n".join(lines)


def _send_at(text: str) -> float:
    """
    Read C{--send-at}, refusing a time past the year 9999 in UTC (times are
    shown in UTC, and such a time cannot be).

    @raise ValidationError: for the field C{send_at}.
    """
    when = parse_send_at(text)
    if when > _LATEST_SEND_AT:
        raise ValidationError(
            "send_at",
            f"{text[:40]!r} is later than 9999-12-31T23:59:59Z, the last time a send can have",
        )
    return when


def _campaign_add(args: argparse.Namespace, context: Context) -> Output:
    for option in ("--list", "--subject", "--sender", "--text", "--html", "--send-at"):
        _utf8(getattr(args, option[2:].replace("-", "_")), option)
    text = args.text if args.text_file is None else _read_text(args.text_file, "--text-file")
    html = args.html if args.html_file is None else _read_text(args.html_file, "--html-file")
    send_at = None if args.send_at is None else _send_at(args.send_at)
    campaign = context.campaign_store().create(
        args.list,
        args.subject,
        sender=args.sender,
        text=text,
        html=html,
        priority=validate_priority(args.priority),
        send_at=send_at,
        created_by="smtpgw-admin",
    )
    now = context.clock.seconds()
    return Output(campaign_document(campaign, now), _campaign_text(campaign, now))


def _campaign_list(args: argparse.Namespace, context: Context) -> Output:
    state = None
    if args.state is not None:
        try:
            state = CampaignState(args.state)
        except ValueError:
            names = ", ".join(s.value for s in CampaignState)
            raise UsageError(f"--state: {args.state!r} is not one of {names}") from None
    campaigns = context.campaign_store().campaigns(args.list, state, limit=1000, bodies=False)
    now = context.clock.seconds()
    documents = [campaign_document(c, now) for c in campaigns]
    if not documents:
        return Output({"campaigns": []}, "no console sends")
    rows = [("ID", "LIST", "STATE", "PRI", "SENT", "SEND AT", "SUBJECT")] + [
        (
            str(d["id"]),
            d["list"],
            d["state"] + (f" ({d['paused_reason']})" if d["paused_reason"] else ""),
            str(d["priority"]),
            f"{d['sent']}/{'?' if d['total'] is None else d['total']}",
            d["send_at"] or "now",
            _one_line(d["subject"])[:50],
        )
        for d in documents
    ]
    return Output({"campaigns": documents}, _table(rows))


def _campaign_show(args: argparse.Namespace, context: Context) -> Output:
    campaign = context.campaign_store().get(args.id)
    if campaign is None:
        raise CommandError(f"no console send {args.id}")
    now = context.clock.seconds()
    return Output(campaign_document(campaign, now), _campaign_text(campaign, now))


def _campaign_change(verb: str) -> Handler:
    def change(args: argparse.Namespace, context: Context) -> Output:
        store = context.campaign_store()
        campaign: Campaign = getattr(store, verb)(args.id)
        now = context.clock.seconds()
        return Output(
            campaign_document(campaign, now),
            _campaign_text(campaign, now) + "\nnote: a running gateway takes this up within "
            "a second",
        )

    return change


def add_campaign_commands(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """
    C{campaign add}, C{list}, C{show ID}, C{pause ID}, C{resume ID},
    C{cancel ID}: console sends, written to the database; a running gateway
    takes changes up within a second.
    """
    group = subparsers.add_parser(
        "campaign",
        help="console sends to a list's recipients",
        description="Console sends to a list's recipients (the gateway sends them).",
    )
    commands = group.add_subparsers(dest="campaign_command", metavar="COMMAND", required=True)
    add = add_command(commands, "add", _campaign_add, "create a console send, now or at --send-at")
    add.add_argument("--list", required=True, metavar="NAME", help="the list to send to")
    add.add_argument("--subject", required=True, metavar="TEXT", help="merge fields: {{name}}")
    add.add_argument("--sender", required=True, metavar="ADDRESS", help="the From address")
    text = add.add_mutually_exclusive_group()
    text.add_argument("--text", metavar="TEXT", help="the text body")
    text.add_argument("--text-file", metavar="FILE", help="the text body, from a file")
    html = add.add_mutually_exclusive_group()
    html.add_argument("--html", metavar="HTML", help="the HTML body")
    html.add_argument("--html-file", metavar="FILE", help="the HTML body, from a file")
    add.add_argument("--priority", metavar="N", default="3", help="1 (very high) to 5; default 3")
    add.add_argument(
        "--send-at", metavar="TIME", help="ISO 8601, as 2030-01-31T09:00:00Z; default now"
    )
    listing = add_command(commands, "list", _campaign_list, "show the console sends, newest first")
    listing.add_argument("--list", metavar="NAME", help="only those of this list")
    listing.add_argument(
        "--state", metavar="STATE", help="scheduled, sending, paused, finished or cancelled"
    )
    show = add_command(commands, "show", _campaign_show, "show one console send")
    show.add_argument("id", metavar="ID", type=int)
    for verb, help in (
        ("pause", "pause a console send (its messages in the queue wait too)"),
        ("resume", "resume a console send an admin paused"),
        ("cancel", "cancel a console send; no further recipient gets it"),
    ):
        command = add_command(commands, verb, _campaign_change(verb), help)
        command.add_argument("id", metavar="ID", type=int)


COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction[_Parser]], None]] = [
    add_list_commands,
    add_user_commands,
    add_queue_commands,
    add_admin_commands,
    add_token_commands,
    add_recipient_commands,
    add_campaign_commands,
]
"""
The command groups, each a function that adds its parser.
"""


def build_parser() -> _Parser:
    """
    The whole command line.
    """
    parser = _Parser(
        prog=PROG,
        description="Manage an smtpgw data directory (also while the gateway runs).",
    )
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"the gateway's data directory (default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for add_group in COMMAND_GROUPS:
        add_group(groups)
    return parser


def _rounds_from_environment(environ: os._Environ[str] | dict[str, str]) -> int:
    text = environ.get(ROUNDS_ENVIRONMENT_VARIABLE)
    if text is None:
        return DEFAULT_ROUNDS
    try:
        rounds = int(text)
    except ValueError:
        rounds = 0
    if not MIN_ROUNDS <= rounds <= MAX_ROUNDS:
        raise UsageError(
            f"{ROUNDS_ENVIRONMENT_VARIABLE} must be a number from {MIN_ROUNDS} "
            f"to {MAX_ROUNDS}, not {text!r}"
        )
    return rounds


def _system_clock() -> IReactorTime:
    from twisted.internet import reactor

    clock: IReactorTime = reactor
    return clock


def _print(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _run(argv: Sequence[str], clock: IReactorTime | None) -> tuple[Output, bool]:
    args = build_parser().parse_args(argv)
    context = Context(
        data_dir=Path(args.data_dir),
        clock=_system_clock() if clock is None else clock,
        rounds=_rounds_from_environment(os.environ),
    )
    try:
        output: Output = args.handler(args, context)
    finally:
        context.close()
    return output, bool(args.json)


def main(argv: Sequence[str] | None = None, *, clock: IReactorTime | None = None) -> int:
    """
    Run one C{smtpgw-admin} command.

    @param argv: the arguments, without the program name; default
        C{sys.argv[1:]}.
    @param clock: gives the time of new records; default the reactor's.
    @return: the exit status.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        output, as_json = _run(arguments, clock)
    except SystemExit as e:
        # --help and --version print and exit; nothing else calls exit.
        return e.code if isinstance(e.code, int) else EXIT_OK
    except ValidationError as e:
        return _fail(_validation_message(e), EXIT_USAGE)
    except CommandError as e:
        return _fail(str(e), e.exit_status)
    except StoreError as e:
        return _fail(str(e), EXIT_FAILED)
    if as_json:
        _print(json.dumps(output.document, indent=2, ensure_ascii=False))
    else:
        _print(output.text)
    return EXIT_OK


def _fail(message: str, status: int) -> int:
    sys.stderr.write(f"{PROG}: error: {_one_line(message)}\n")
    return status
