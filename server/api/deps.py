"""Typed dependencies: the services built in the lifespan, and API-key checks."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from ..config import Settings
from ..errors import AuthError, NotReadyError
from ..metrics import Metrics

if TYPE_CHECKING:  # types only: the HTTP layer never imports torch
    from ..adapters.registry import Registry
    from ..engine.engine import Engine
    from ..engine.service import GenerationService


@dataclass
class Services:
    """What the lifespan builds, filled in once the model has loaded."""

    settings: Settings
    metrics: Metrics
    registry: Registry | None = None
    generation: GenerationService | None = None
    engine: Engine | None = None
    model_name: str = ""
    load_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready


@dataclass(frozen=True)
class Ready:
    """What a handler that needs the model gets: every service there, none optional."""

    settings: Settings
    metrics: Metrics
    registry: Registry
    generation: GenerationService
    model_name: str
    model_config: Any = None  # the base model's HF config (demo adapters are written for its shapes)


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_ready(request: Request) -> Ready:
    s: Services = request.app.state.services
    if not s.ready or s.registry is None or s.generation is None:
        raise NotReadyError(s.load_error or "the model is still loading; retry shortly")
    assert s.engine is not None
    return Ready(s.settings, s.metrics, s.registry, s.generation, s.model_name, s.engine.runner.cfg)


def _presented_key(request: Request) -> str:
    """The key a client sent: `Authorization: Bearer <key>`, or `X-API-Key`."""
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())  # constant time


def _check_key(request: Request, expected: str | None, what: str) -> None:
    if expected is None:
        return
    given = _presented_key(request)
    if not given:
        raise AuthError(f"this endpoint needs the {what} API key: send 'Authorization: Bearer <key>'", 401)
    if not _matches(given, expected):
        raise AuthError(f"the key given is not the {what} API key", 403)


def require_user(request: Request) -> None:
    st: Settings = request.app.state.services.settings
    if st.api_key is None:
        return
    given = _presented_key(request)
    if st.admin_api_key is not None and given and _matches(given, st.admin_api_key):
        return  # the admin key may generate too
    _check_key(request, st.api_key, "generation")


def require_admin(request: Request) -> None:
    st: Settings = request.app.state.services.settings
    _check_key(request, st.admin_api_key, "admin")


ServicesDep = Annotated[Services, Depends(get_services)]
ReadyDep = Annotated[Ready, Depends(get_ready)]
UserAuth = Depends(require_user)
AdminAuth = Depends(require_admin)
