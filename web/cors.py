"""CORS, when CORS_ORIGINS names the origins whose pages may call the API from a browser.

Starlette's middleware does the protocol; this module fixes what a page may send and read and gives a
refused preflight the API's JSON error body. `web.app` adds it only when origins are configured.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from web import errors

# CORS (CORS_ORIGINS): what a page of another origin may send and read. The methods and request
# headers are the ones the document declares (Last-Event-ID: EventSource sends it when it
# reconnects); the exposed headers are the ones this server sends that a client acts on.
CORS_METHODS = ("GET", "POST")
CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID", "X-API-Version", "X-Request-ID")
CORS_EXPOSED_HEADERS = ("Retry-After", "WWW-Authenticate", "X-Request-ID", "Allow")
CORS_MAX_AGE_SECONDS = 600


class Cors(CORSMiddleware):
    """Starlette's CORS middleware, placed inside `RequestContext` (a preflight is logged and carries
    its request id, so a refused origin shows in the access log) and outside everything that
    answers, the fast lane and Connexion's error handlers included: every answer of the app,
    errors too, carries `Access-Control-Allow-Origin` for an allowed origin, so a browser lets the
    page read a 401, 404, 429 or 503. A preflight is answered here, before authentication (a
    browser sends it without the Authorization header); a refused one gets the JSON error body."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers=request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode("latin-1").removeprefix("Disallowed CORS ")
        message = (
            f"Cross-origin request refused ({refused} not allowed): this API allows the methods "
            f"{', '.join(CORS_METHODS)} and the headers {', '.join(CORS_REQUEST_HEADERS)} (besides "
            "the CORS-safelisted Accept, Accept-Language and Content-Language), from the origins it "
            "is configured for."
        )
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        return Response(errors.error_body(400, message), 400, headers=headers, media_type="application/json")


def cors_options(origins: tuple[str, ...]) -> dict[str, Any]:
    """The options of `Cors` for CORS_ORIGINS. No credentials: the API reads no cookie, a bearer
    token travels in `Authorization` (or, for EventSource, the stream's `access_token`), so a page
    never needs the browser's credentials and `*` can be allowed without letting any site act as
    a signed-in user."""
    return {
        "allow_origins": origins,
        "allow_methods": CORS_METHODS,
        "allow_headers": CORS_REQUEST_HEADERS,
        "expose_headers": CORS_EXPOSED_HEADERS,
        "allow_credentials": False,
        "max_age": CORS_MAX_AGE_SECONDS,
    }
