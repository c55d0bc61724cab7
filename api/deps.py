"""FastAPI dependencies: state, sessions, and who the caller is (API tokens and scopes)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.registration import Registrar
from api.state import AppState
from db.status import Scope
from db.tokens import ActiveToken, find_active_token


# Dependencies that do no I/O are coroutines: FastAPI runs each plain ``def`` dependency on a
# thread of its pool, a hop there and back per request.
async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.radq
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def get_registrar(request: Request) -> Registrar:
    registrar: Registrar = request.app.state.registrar
    return registrar


RegistrarDep = Annotated[Registrar, Depends(get_registrar)]


# --- authentication and scopes -------------------------------------------------------------

bearer = HTTPBearer(
    auto_error=False,  # our 401 names what to do, and carries WWW-Authenticate
    description="An API token: `radq tokens create --name NAME --scope read|submit|admin`.",
)
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's name and scope (``anonymous`` admin with RADQ_AUTH=false)."""

    name: str
    scope: Scope


ANONYMOUS = Caller("anonymous", Scope.ADMIN)


async def authenticate(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Caller:
    """The caller of this request; 401 when the token is missing, unknown or revoked.

    The token itself never reaches a log line or an error message. A coroutine that goes to
    a thread only to look the token up: with auth off, no hop at all.
    """
    if not state.settings.auth:
        return ANONYMOUS
    if credentials is None:
        raise HTTPException(
            401,
            "missing API token: send 'Authorization: Bearer <token>' (create one with `radq tokens create`)",
            headers=_CHALLENGE,
        )
    token = await run_in_threadpool(_lookup, state, credentials.credentials)
    if token is None:
        raise HTTPException(401, "invalid or revoked API token", headers=_CHALLENGE)
    return Caller(token.name, token.scope)


def _lookup(state: AppState, secret: str) -> ActiveToken | None:
    with state.sessions() as session:
        return find_active_token(session, secret)


CallerDep = Annotated[Caller, Depends(authenticate)]


class RequireScope:
    """A dependency that lets the request through only with a token of ``scope`` or above."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def __call__(self, caller: CallerDep) -> Caller:
        return _require(self.scope, caller)


def _require(scope: Scope, caller: Caller) -> Caller:
    if not caller.scope.allows(scope):
        raise HTTPException(
            403, f"this needs a token with scope '{scope}' or above; token '{caller.name}' has "
            f"'{caller.scope}'",
        )  # fmt: skip
    return caller


ReadDep = Annotated[Caller, Depends(RequireScope(Scope.READ))]
SubmitDep = Annotated[Caller, Depends(RequireScope(Scope.SUBMIT))]
AdminDep = Annotated[Caller, Depends(RequireScope(Scope.ADMIN))]


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def default_scope(request: Request, caller: CallerDep) -> Caller:
    """Every /v1 and /dicomweb route's floor: reading needs 'read', anything else 'submit'.

    Routes declare their scope too (``SubmitDep``, ``AdminDep``); this keeps a route that
    forgets from being open to a read-only token.
    """
    needed = Scope.READ if request.method in _SAFE_METHODS else Scope.SUBMIT
    return _require(needed, caller)
