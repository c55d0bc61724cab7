"""API tokens: created with a random secret that is shown once and stored only as its SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from db.models import ApiToken, utcnow
from db.status import Scope
from radq.errors import RadqError

PREFIX_LENGTH = 6
"""Characters of the token kept in clear to tell tokens apart in listings (36 of its 256 bits)."""


class TokenError(RadqError):
    """Raised when a token cannot be created or revoked as asked (the message says why)."""


@dataclass(frozen=True)
class NewToken:
    """A token just created: ``secret`` exists only here and is never stored."""

    name: str
    scope: Scope
    secret: str


def token_digest(secret: str) -> str:
    """The stored form of a token: SHA-256 hex of its text."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(session: Session, *, name: str, scope: Scope) -> NewToken:
    """Create a token called ``name``; the caller commits and shows ``secret`` once.

    Raises:
        TokenError: the name is empty, too long, or already used (revoked tokens keep theirs).
    """
    name = name.strip()
    if not name or len(name) > 64:
        raise TokenError("a token name must have 1 to 64 characters")
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise TokenError(f"a token named {name!r} exists already (names stay taken after revocation)")
    secret = secrets.token_urlsafe(32)
    session.add(
        ApiToken(name=name, prefix=secret[:PREFIX_LENGTH], token_sha256=token_digest(secret), scope=scope)
    )
    session.flush()
    return NewToken(name, scope, secret)


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, revoked ones included, oldest first."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(session: Session, name: str) -> ApiToken:
    """Revoke the token called ``name`` (from now on it answers 401).

    Raises:
        TokenError: no such token, or it was revoked already.
    """
    token = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if token is None:
        raise TokenError(f"no token named {name!r} (see `radq tokens list`)")
    if token.revoked_at is not None:
        raise TokenError(f"token {name!r} was revoked already")
    token.revoked_at = utcnow()
    return token


@dataclass(frozen=True)
class ActiveToken:
    """Who a live token says the caller is."""

    name: str
    scope: Scope


def find_active_token(session: Session, secret: str) -> ActiveToken | None:
    """The live (not revoked) token whose secret is ``secret``, or None.

    Asked on every authenticated request: one cached statement and a plain row.
    """
    row = session.execute(_active_token(), {"b_digest": token_digest(secret)}).first()
    return None if row is None else ActiveToken(row.name, Scope(row.scope))


@lru_cache(maxsize=1)
def _active_token() -> Select[str, str]:
    return select(ApiToken.name, ApiToken.scope).where(
        ApiToken.token_sha256 == bindparam("b_digest"), ApiToken.revoked_at.is_(None)
    )


def issue_token(database_url: str, *, name: str, scope: Scope) -> str:
    """Create a token in the database at ``database_url`` and return its secret (bench, tests)."""
    from db.session import make_engine, make_sessionmaker, transaction

    engine = make_engine(database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            return create_token(session, name=name, scope=scope).secret
    finally:
        engine.dispose()
