"""The audit log: one :class:`~dfz.mgr.models.AuditLog` row per change, added to the session of the change
so that both commit or neither does. Secrets never reach it (:func:`redact`)."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session

from .models import AuditLog

SECRET_KEYS = frozenset(
    {"password", "password_hash", "password_sealed", "token", "token_hash", "current_password", "new_password"}
)
REDACTED = "***"


@dataclass(frozen=True)
class Actor:
    """Who made a change: a user through a session or a token, or the manager itself (``system``)."""

    user_id: int | None
    name: str
    via: str
    token_id: int | None = None
    ip: str = ""


SYSTEM = Actor(user_id=None, name="system", via="system")


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data: times as ISO 8601, enums by value, containers converted."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if hasattr(value, "model_dump"):
        return jsonable(value.model_dump(mode="json"))
    return value


def redact(value: Any) -> Any:
    """A copy of ``value`` with every secret-named key's value replaced by ``***``."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if k in SECRET_KEYS and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """``{field: {"from": old, "to": new}}`` for the fields whose value changed."""
    changed: dict[str, Any] = {}
    for key in after:
        old, new = jsonable(before.get(key)), jsonable(after[key])
        if old != new:
            changed[key] = {"from": old, "to": new}
    return redact(changed)  # type: ignore[no-any-return]


def record(  # noqa: PLR0917 - reads as a sentence: who did what to which
    session: Session,
    actor: Actor,
    action: str,
    resource_type: str,
    resource_id: object,
    changes: Mapping[str, Any] | None = None,
) -> AuditLog:
    """Add the entry for a change to ``session`` (committed with it)."""
    entry = AuditLog(
        actor_user_id=actor.user_id,
        actor_name=actor.name[:64],
        via=actor.via,
        token_id=actor.token_id,
        action=action,
        resource_type=resource_type,
        resource_id="" if resource_id is None else str(resource_id),
        changes=redact(jsonable(dict(changes or {}))),
        ip=actor.ip[:64],
    )
    session.add(entry)
    return entry
