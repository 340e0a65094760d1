"""Who may call the server, and how: an ASGI wrapper that answers before any route runs.

    app = AccessGuard(app, api_key="sk-...", allowed_hosts=["localhost", "127.0.0.1"], max_body_bytes=4 << 20)

In order, each a JSON error in OpenAI's format:
- Host header not in `allowed_hosts` (when set): 400. A page on another site that rebinds its
  DNS name to 127.0.0.1 still sends its own name as Host, so this stops DNS-rebinding attacks.
- `/v1/*` without `Authorization: Bearer <api_key>` (when a key is set): 401, as vLLM does;
  `/health`, `/docs` and `/openapi.json` stay open.
- A POST to `/v1/*` whose Content-Type is not `application/json`: 415. A web page can send a
  `text/plain` POST to any address without asking (no CORS preflight); JSON needs a preflight,
  which this server never grants.
- A declared Content-Length above `max_body_bytes`: 413 before the body is read (a chunked body
  is counted as it arrives, in `nanoseek.infer.server`).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from nanoseek.infer.protocol import APIError, limit_error

OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/redoc")


def host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class AccessGuard:
    """Checks host, API key, content type and declared size of each HTTP request (see module doc)."""

    def __init__(self, app: ASGIApp, api_key: str | None = None, allowed_hosts: Sequence[str] | None = None,
                 max_body_bytes: int | None = None):
        self.app, self.api_key, self.max_body_bytes = app, api_key or None, max_body_bytes
        hosts = [host_name(h) for h in allowed_hosts or []]
        self.allowed_hosts = None if not hosts or "*" in hosts else set(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> APIError | None:
        headers, path = Headers(scope=scope), scope["path"]
        if self.allowed_hosts is not None and host_name(headers.get("host", "")) not in self.allowed_hosts:
            return APIError(400, f"Host header {headers.get('host', '')[:100]!r} is not allowed here (nanoseek "
                                 "serve --allowed-hosts lists the names clients may use)", code="host_not_allowed")
        if not path.startswith("/v1") or path.startswith(OPEN_PATHS):
            return None
        if self.api_key is not None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return APIError(415, f"Content-Type {media or 'missing'!r}: send the body as application/json",
                                code="unsupported_media_type")
            length = headers.get("content-length", "")
            if self.max_body_bytes is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return limit_error("max_body_bytes", f"the body has {int(length):,} bytes", status=413)
        return None
