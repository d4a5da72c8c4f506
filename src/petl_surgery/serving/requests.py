"""What a request to the task server holds, checked before it joins a batch.

A request is a JSON object ``{"task": NAME, "pixels": [[[...]]]}``: the task's name and one preprocessed
image as nested lists of numbers of the served model's input shape ``(channels, height, width)`` (resized
and normalised as the model expects). The answer is ``{"task": NAME, "logits": [...]}``, the task's own
logits (its class count).

:class:`RequestCheck` is an ASGI middleware of the API server: it answers a malformed request (400) or an
unknown task (404) itself, with a message, so that a bad request never reaches a batch and never fails the
requests batched with it.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

Scope = Dict[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]


class BadRequest(ValueError):
    """A request the server refuses: ``status`` (400 malformed, 404 unknown task) and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _shape_of(value: Any, depth: int) -> Optional[List[int]]:
    """The nested-list shape of ``value`` when it is a regular array of numbers of ``depth`` levels."""
    if depth == 0:
        return [] if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if not isinstance(value, list) or not value:
        return None
    inner = _shape_of(value[0], depth - 1)
    if inner is None:
        return None
    for item in value[1:]:
        if _shape_of(item, depth - 1) != inner:
            return None
    return [len(value), *inner]


def check_request(body: Any, tasks: Sequence[str], shape: Tuple[int, int, int]) -> Tuple[str, Any]:
    """``(task, pixels)`` of a request body (parsed JSON); BadRequest naming what is wrong otherwise."""
    if not isinstance(body, dict):
        raise BadRequest(400, 'a request is a JSON object {"task": NAME, "pixels": [[[...]]]}')
    unknown = sorted(set(body) - {"task", "pixels"})
    if unknown:
        raise BadRequest(400, f"unknown field(s) {', '.join(map(repr, unknown))}; a request holds 'task' and 'pixels'")
    task = body.get("task")
    if not isinstance(task, str):
        raise BadRequest(400, f"'task' must be a task name (a string); got {task!r}")
    if task not in tasks:
        raise BadRequest(404, f"unknown task {task!r}; this server runs: {', '.join(tasks)}")
    if "pixels" not in body:
        raise BadRequest(400, "'pixels' is missing: one preprocessed image as nested lists (channels, height, width)")
    found = _shape_of(body["pixels"], 3)
    if found != list(shape):
        described = "not a regular array of numbers of 3 levels" if found is None else f"of shape {found}"
        raise BadRequest(400, f"'pixels' must be numbers of shape {list(shape)} (channels, height, width); got {described}")
    return task, body["pixels"]


class RequestCheck:
    """ASGI middleware: POSTs to ``path`` are parsed and checked (:func:`check_request`) before the server
    queues them; a bad one is answered here with its status and ``{"detail": message}``."""

    def __init__(self, app: Callable[..., Awaitable[None]], path: str, tasks: Sequence[str], shape: Sequence[int]) -> None:
        self.app = app
        self.path = path
        self.tasks = list(tasks)
        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise BadRequest(400, "the request body is not JSON") from None
            check_request(parsed, self.tasks, self.shape)
        except BadRequest as error:
            await _answer(send, error.status, {"detail": str(error)})
            return
        replayed = False

        async def replay() -> Dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _answer(send: Send, status: int, content: Dict[str, Any]) -> None:
    payload = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
