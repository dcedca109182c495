"""Request body size limit, as pure ASGI middleware: 413 in OpenAI's error shape.

A declared Content-Length over the limit is refused before anything is read; a chunked body
is counted as it arrives and refused once it passes the limit. The body is buffered (the
routes parse JSON bodies whole anyway) and handed on unchanged.
"""

from __future__ import annotations

import json

from server.errors import error_body


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as usual

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        payload = json.dumps(error_body(
            f"the request body is larger than {self.max_bytes} bytes (MOME_MAX_REQUEST_BYTES)",
            413, type_="invalid_request_error")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
