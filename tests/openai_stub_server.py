"""A minimal OpenAI-compatible chat server for tests: real HTTP on 127.0.0.1, scriptable per request.

`POST /v1/chat/completions` checks the bearer key (401) and the model (404) like a real server, then
plays the next scripted `Reply` (or the default one): a canned answer, an error status, a delay, or a
dropped connection (the socket closed without a response). Every request to the endpoint is recorded
in `requests` (rejected ones too), so a test can count what a client really sent. Standard library only.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from persd_online.tasks import Task

ANSWER = "Here is the fix:\n```python\ndef add(a, b):\n    return a + b\n```\n"


@dataclass(frozen=True)
class Reply:
    """What the server does with one request."""

    content: str = ANSWER
    status: int = 200
    delay_s: float = 0.0
    drop: bool = False
    prompt_tokens: int = 10
    completion_tokens: int = 5
    headers: dict[str, str] = field(default_factory=dict)


class StubOpenAIServer:
    """A threaded HTTP server on a free loopback port; use as a context manager."""

    def __init__(self, model: str = "stub-teacher", api_key: str | None = None, default: Reply = Reply(),
                 responder: Callable[[dict[str, Any]], Reply] | None = None):
        self.model = model
        self.api_key = api_key
        self.default = default
        self.responder = responder  # computes the reply from the request when no scripted one is queued
        self.requests: list[dict[str, Any]] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order; the default reply follows."""
        with self._lock:
            self._script.extend(replies)

    def __enter__(self) -> StubOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(body)

    def _next(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            if self._script:
                return self._script.popleft()
        return self.responder(body) if self.responder is not None else self.default


def reference_reply(tasks: list[Task], body: dict[str, Any], delay_s: float = 0.0) -> Reply:
    """A teacher's answer that is the reference solution of the task the request is about (found by its
    prompt text in the last message), with token counts of about a quarter of the characters."""
    text = body["messages"][-1]["content"]
    task = next(t for t in tasks if t.prompt.strip() in text)
    return Reply(content=f"Corrected:\n```python\n{task.reference}\n```", prompt_tokens=len(text) // 4,
                 completion_tokens=len(task.reference or "") // 4, delay_s=delay_s)


def _error(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _handler(server: StubOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path != "/v1/chat/completions":
                return self._send(404, _error(404, f"no route {self.path}", "not_found"))
            server._record(body)
            if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                return self._send(401, _error(401, "Incorrect API key provided.", "invalid_api_key"))
            if body.get("model") != server.model:
                return self._send(404, _error(404, f"The model `{body.get('model')}` does not exist.",
                                              "invalid_request_error"))
            reply = server._next(body)
            time.sleep(reply.delay_s)
            if reply.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            if reply.status != 200:
                return self._send(reply.status, _error(reply.status, f"scripted HTTP {reply.status}", "stub"),
                                  reply.headers)
            return self._send(200, {
                "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                "model": server.model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply.content}}],
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "total_tokens": reply.prompt_tokens + reply.completion_tokens},
            }, reply.headers)

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                pass

    return Handler
