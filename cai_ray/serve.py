"""HTTP services: the preference model and the feedback model for other jobs.

    CAI_RAY_SERVE_TOKEN=... cai-ray serve --config C --output DIR [--what pm,judge]

    POST /v1/score   {"items": [{"prompt": "..." | "messages": [...], "response": "..."}]}
                     → {"scores": [float, ...]}            (PM score of each response)
    POST /v1/judge   {"items": [{"prompt" | "messages", "response_a", "response_b",
                                 "aspect": "harmless" | "helpful"}]}
                     → {"p_a": [float, ...]}               (soft label, as `cai-ray label`)
    GET  /healthz    → {"ok": true, "services": [...]}     (no token needed, no data)

Safe by default: bound to 127.0.0.1; every /v1 request needs `Authorization: Bearer <token>`
with the token from `serve.token_env` (compared in constant time; the server refuses to start
without one, and the token is never logged or saved); bodies over `serve.max_body_bytes` get
413 before they are read, as do requests over `serve.max_items`; only JSON is accepted and a
malformed item is named in a 400. The models run in their actor groups, as in the pipeline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cai_ray.config import ServeConfig
from cai_ray.messages import ChatMessage

log = logging.getLogger(__name__)

Handler = Callable[[list[dict[str, Any]]], dict[str, Any]]


class RequestError(ValueError):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def conversation(item: dict[str, Any], where: str) -> list[ChatMessage]:
    if isinstance(item.get("messages"), list) and item["messages"]:
        msgs = item["messages"]
        if all(isinstance(m, dict) and isinstance(m.get("role"), str) and
               isinstance(m.get("content"), str) for m in msgs):
            return msgs
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}.messages: each turn needs string "
                           "'role' and 'content'")
    if isinstance(item.get("prompt"), str) and item["prompt"].strip():
        return [{"role": "user", "content": item["prompt"]}]
    raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: needs 'prompt' (string) or "
                       "'messages' (chat turns)")


def text_field(item: dict[str, Any], key: str, where: str) -> str:
    v = item.get(key)
    if not isinstance(v, str):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}.{key}: expected a string")
    return v


class Service:
    """The HTTP front: routing, auth, limits; `handlers` maps a path to the model call."""

    def __init__(self, cfg: ServeConfig, token: str, handlers: dict[str, Handler]):
        if not token:
            raise ValueError(f"no bearer token: set {cfg.token_env} (the services never run "
                             "without authentication)")
        self.cfg, self._token, self.handlers = cfg, token.encode(), handlers
        self._lock = threading.Lock()  # one model call at a time per service process
        service = self

        class _H(BaseHTTPRequestHandler):
            server_version = "cai-ray"

            def log_message(self, fmt: str, *args: Any) -> None:  # no headers, no token
                log.debug("%s %s", self.address_string(), fmt % args)

            def _send(self, status: HTTPStatus, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == HTTPStatus.UNAUTHORIZED:
                    self.send_header("WWW-Authenticate", 'Bearer realm="cai-ray"')
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/healthz":
                    self._send(HTTPStatus.OK, {"ok": True, "services": sorted(service.handlers)})
                else:
                    self._send(HTTPStatus.NOT_FOUND, {"error": "unknown path"})

            def do_POST(self) -> None:  # noqa: N802
                try:
                    status, body = service.handle(self.path, self.headers, self.rfile)
                except RequestError as e:
                    status, body = e.status, {"error": str(e)}
                    self.close_connection = True  # an unread body must not reach the next call
                except Exception as e:  # noqa: BLE001 - a model failure is a 500, logged
                    log.exception("service error")
                    status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {
                        "error": f"{type(e).__name__}: {e}"}
                self._send(status, body)

        self.server = ThreadingHTTPServer((cfg.host, cfg.port), _H)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self._token)

    def handle(self, path: str, headers: Any, rfile: Any) -> tuple[HTTPStatus, dict[str, Any]]:
        if path not in self.handlers:
            raise RequestError(HTTPStatus.NOT_FOUND, f"unknown path {path!r}; this server "
                               f"has {sorted(self.handlers)}")
        if not self.authorized(headers.get("Authorization")):
            raise RequestError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
        try:
            length = int(headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required") from None
        if length > self.cfg.max_body_bytes:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"body of {length} bytes is over serve.max_body_bytes="
                               f"{self.cfg.max_body_bytes}")
        if "json" not in (headers.get("Content-Type") or ""):
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        try:
            body = json.loads(rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid JSON: {e}") from None
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items or \
                not all(isinstance(x, dict) for x in items):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body must be {\"items\": [object, ...]}"
                               " with at least one item")
        if len(items) > self.cfg.max_items:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"{len(items)} items is over serve.max_items="
                               f"{self.cfg.max_items}")
        with self._lock:
            return HTTPStatus.OK, self.handlers[path](items)

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.server.serve_forever, daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def pm_handler(group: Any, max_restarts: int = 3) -> Handler:
    """/v1/score: PM scores; a reward actor that dies or hangs is restarted, reloads the PM
    (the group's restore hook, `reward_group`) and the batch is scored again."""
    from cai_ray.actors.reward import RewardWorker

    def score(items: list[dict[str, Any]]) -> dict[str, Any]:
        pairs = [(conversation(x, f"items[{i}]"), text_field(x, "response", f"items[{i}]"))
                 for i, x in enumerate(items)]
        return {"scores": group.with_restarts(
            lambda: group.shard_and_gather(RewardWorker.score, pairs), max_restarts)}

    return score


def judge_handler(group: Any, labeller: Any) -> Handler:
    from cai_ray.actors.feedback import judge

    def p_a(items: list[dict[str, Any]]) -> dict[str, Any]:
        queries, sizes = [], []
        for i, x in enumerate(items):
            where = f"items[{i}]"
            aspect = x.get("aspect", "harmless")
            if aspect not in ("harmless", "helpful"):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}.aspect: 'harmless' or "
                                   f"'helpful', got {aspect!r}")
            key = hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]
            qs = labeller.queries(f"serve|{key}",
                                  conversation(x, where), text_field(x, "response_a", where),
                                  text_field(x, "response_b", where), aspect)
            queries += qs
            sizes.append((len(qs), aspect))
        probs = judge(group, labeller, queries)
        out, at = [], 0
        for n, aspect in sizes:
            out.append(labeller.fold(probs[at:at + n], aspect)[0])
            at += n
        return {"p_a": out}

    return p_a


def token_from_env(cfg: ServeConfig) -> str:
    return os.environ.get(cfg.token_env, "")
