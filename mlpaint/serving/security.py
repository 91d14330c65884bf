"""Security headers on every response: what the page may load and run, no MIME sniffing, no
referrer sent elsewhere, and no framing by another site."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The page's own script and styles, its own API, nothing inline, nothing from elsewhere, no
#: frames, no forms posted anywhere. Canvases are drawn through the CSSOM and ImageData,
#: which a policy does not govern.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Adds the headers above to every HTTP response, and the Content-Security-Policy to all
    but the paths in `policy_exempt` (FastAPI's interactive API documents, which load their
    scripts from a CDN and run an inline one).

    Plain ASGI, as BodySizeLimit is: a header set costs nothing a request would notice."""

    def __init__(self, app: ASGIApp, policy_exempt: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.policy_exempt = policy_exempt
        # Built once: the request path only chooses between them.
        self.with_policy = [*HEADERS,
                            (b"content-security-policy", CONTENT_SECURITY_POLICY.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = HEADERS if scope["path"] in self.policy_exempt else self.with_policy

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
