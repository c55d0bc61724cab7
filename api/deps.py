"""FastAPI dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.registration import Registrar
from api.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.radq
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_registrar(request: Request) -> Registrar:
    registrar: Registrar = request.app.state.registrar
    return registrar


RegistrarDep = Annotated[Registrar, Depends(get_registrar)]
