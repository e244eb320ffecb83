"""Refuse a /v1/ request that carries no bearer token before anything reads its body.

FastAPI parses a JSON body before it runs any dependency, so without this gate a keyless request with an
unparseable body was answered 400 (and an oversized upload 413) although the contract (DESIGN.md) says every
route but /healthz needs a key. The gate only looks for an `Authorization: Bearer <token>` header; whether the
key is known is still `api.deps.get_tenant`'s job (one database or cache lookup, after the body). CORS preflights
(OPTIONS) carry no credentials by design and pass; CORSMiddleware wraps this gate, so a browser sees its 401.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import problem_response

MISSING_KEY = "send `Authorization: Bearer <api key>`; create a key with `hwprune keys create --tenant NAME`"
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def has_bearer_token(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return scheme.lower() == "bearer" and bool(token.strip())
    return False


def has_body(scope: Scope) -> bool:
    headers = dict(scope.get("headers", ()))
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


class RequireBearer:
    """Pure ASGI middleware (no BaseHTTPMiddleware: that buffers streaming responses such as the SSE events)."""

    def __init__(self, app: ASGIApp, prefix: str = "/v1/") -> None:
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(self.prefix)
                and not has_bearer_token(scope)):
            # a body we will not read (an upload may be hundreds of MB): close the connection after the answer,
            # as api.problems does for oversized uploads, instead of leaving it to be drained
            headers = {**CHALLENGE, "Connection": "close"} if has_body(scope) else CHALLENGE
            await problem_response(Request(scope), 401, MISSING_KEY, headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)
