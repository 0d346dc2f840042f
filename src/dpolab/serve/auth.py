"""Access with an API key (``dpolab serve --api-key`` / ``DPOLAB_API_KEY``), for a server that
others can reach.

API clients send ``Authorization: Bearer KEY``, which is what the ``openai`` client sends for its
``api_key``. A browser cannot add that header to a page load, so the app also takes HTTP Basic
with the key as the password: the browser asks once, then sends it with every request the page
makes. A browser sends those credentials with requests that other sites' pages make too, so a
Basic-authenticated request that does something (anything but GET) must come from this app's page.
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import urlsplit

from flask import Response, request

from dpolab.serve.validation import ApiError

OPEN_PATHS = ("/healthz",)  # health checks of load balancers and service managers carry no key
REALM = 'Basic realm="dpolab serve: any user name, the API key as password", charset="UTF-8"'


def require_key(key: str) -> Any:
    """Answer 401 unless the request carries ``key``; None lets it through (a Flask before_request)."""
    if request.path in OPEN_PATHS:
        return None
    auth = request.authorization
    presented = auth.token if auth and auth.type == "bearer" else auth.password if auth and auth.type == "basic" \
        else None
    if presented is not None and hmac.compare_digest(presented.encode(), key.encode()):
        if auth is not None and auth.type == "basic" and request.method not in ("GET", "HEAD"):
            same_origin()
        return None
    message = ("no API key: send 'Authorization: Bearer KEY'" if presented is None
               else "incorrect API key in the Authorization header")
    if request.path.startswith(("/api/", "/v1/", "/metrics")):
        raise ApiError(message, status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return Response(f"401 Unauthorized: {message} (a browser: any user name, the key as password)\n", 401,
                    {"WWW-Authenticate": REALM}, mimetype="text/plain")


def same_origin() -> None:
    """Refuse (403) a request that a page of another site made: a browser names the page's origin."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise ApiError(f"cross-origin request from {origin!r} refused", status=403, code="cross_origin")
    if request.headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
        raise ApiError("cross-site request refused", status=403, code="cross_origin")
