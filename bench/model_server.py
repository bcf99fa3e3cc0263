"""A local model server speaking OpenAI's, Anthropic's and Ollama's chat APIs: the real provider path without a
model API.

Benchmarks and tests point strands-agents' model providers (``OpenAIModel`` over the ``openai`` SDK,
``AnthropicModel`` over the ``anthropic`` SDK, ``OllamaModel`` over the ``ollama`` client) at this server: request
building, keep-alive, streaming, tool-call assembly, usage and 429s all run for real, while the "model" answers
after a set latency with a tool call whose arguments are valid for the offered schema
(:func:`teamster.agents.scripted.sample_output`).

* ``POST /v1/chat/completions`` (OpenAI), ``POST /v1/messages`` (Anthropic) and ``POST /api/chat`` (Ollama), streamed
  (SSE; Ollama: NDJSON) or not, each in its provider's shapes; a ``/v1`` prefix is optional on every route. Model
  ``latency-<seconds>`` answers after that long, ``hang`` never answers (until the client disconnects), any other
  name after ``latency``. The conversation can ask for the same per request: a message containing ``[hang]`` or
  ``[latency=<seconds>]``. With tools it calls the tool the request's tool choice forces; else, while the
  conversation holds fewer than ``tool_calls`` tool results, the first tool not named ``final_outcome``; else
  ``final_outcome`` if offered, or the last tool. Without tools (or told to call none) it says "ok", or a sample of
  the schema the request wants the text to follow (OpenAI's ``response_format``, Anthropic's ``output_config``,
  Ollama's ``format``).
* Optional fixed-window rate limit: past ``rate_limit`` requests per ``rate_window`` seconds, a 429 (with
  ``retry-after``, in the provider's error shape); ``/stats`` counts the requests that arrived and were accepted in
  each window.
* ``GET /health``, ``GET /stats`` (counters, in-flight peak and time-weighted mean, windows), ``POST /reset``.

Plain asyncio and cheap per request, as it runs beside the system being measured: :class:`ModelServer` runs
it on a loop in a daemon thread, :class:`ModelServerProcess` as ``python -m bench.model_server`` (see
``--help``) whose CPU time can be read apart.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import math
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from teamster.agents.scripted import sample_output

__all__ = ["ModelServer", "ModelServerProcess", "FINAL_TOOL", "main"]

_LATENCY_DIRECTIVE = re.compile(r"\[latency=([0-9.]+)\]")

FINAL_TOOL = "final_outcome"
"""The tool called last (teamster's structured-output tool), once ``tool_calls`` other calls were made."""

_REPO_ROOT = Path(__file__).resolve().parent.parent
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required", 429: "Too Many Requests"}
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
             b"transfer-encoding: chunked\r\n")
_CLOSE = "connection: close\r\n"
_COUNTERS = ("connections", "requests", "completed", "throttled", "hung", "errors", "disconnected",
             "tool_calls_emitted")
_CACHE_MAX = 4096
T = TypeVar("T")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _head(status: int, length: int, keep: bool, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n"
            f"{extra}{'' if keep else _CLOSE}\r\n").encode()


def _error(message: str, kind: str = "invalid_request_error", code: str | None = None) -> bytes:
    return _dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


_PROTOCOLS = {"/chat/completions": "openai", "/messages": "anthropic", "/api/chat": "ollama"}
_RATE_LIMITED = {
    "openai": _error("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
    "anthropic": _dumps({"type": "error", "error": {"type": "rate_limit_error",
                                                    "message": "Rate limit reached for requests"}}).encode(),
    "ollama": _dumps({"error": "rate limit reached for requests"}).encode(),
}
_NDJSON_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n")


def _halves(text: str) -> list[str]:
    """Tool-call arguments streamed in two deltas, as providers split them (an empty half is left out)."""
    half = (len(text) + 1) // 2
    return [part for part in (text[:half], text[half:]) if part]


def _chunked(head: bytes, keep: bool, payloads: list[bytes]) -> bytes:
    """A streamed response, all of it at once: ``head``, then each payload as one chunk, then the last chunk."""
    out = [head, b"\r\n" if keep else _CLOSE.encode() + b"\r\n"]
    for payload in payloads:
        out += (b"%x\r\n" % len(payload), payload, b"\r\n")
    out.append(b"0\r\n\r\n")
    return b"".join(out)


class _Core:
    """Request handling and counters; every method runs on the server's event loop."""

    def __init__(self, latency: float, tool_calls: int, rate_limit: int | None, rate_window: float) -> None:
        if rate_window <= 0:
            raise ValueError("rate_window must be positive")
        self.latency, self.tool_calls, self.rate_limit, self.rate_window = latency, tool_calls, rate_limit, rate_window
        self._ids = itertools.count(1)
        self._cache: dict[tuple[str, str], str] = {}
        self._connections: set[asyncio.Task[Any]] = set()
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Zero the counters and start a fresh rate-limit window (requests in flight stay counted)."""
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self._t0 = self._t_last = time.monotonic()
        self._area = 0.0
        self.in_flight_max = self.in_flight
        self._windows: deque[list[int]] = deque(maxlen=100)  # [window index, accepted, arrived]
        self._max_accepted = self._max_arrived = 0

    def _flight(self, delta: int) -> None:
        now = time.monotonic()
        self._area += self.in_flight * (now - self._t_last)
        self._t_last = now
        self.in_flight += delta
        self.in_flight_max = max(self.in_flight_max, self.in_flight)

    def snapshot(self) -> dict[str, Any]:
        """The counters as served by ``GET /stats``."""
        self._flight(0)
        elapsed = self._t_last - self._t0
        return {**self.counters, "in_flight": self.in_flight, "in_flight_max": self.in_flight_max,
                "in_flight_mean": self._area / elapsed if elapsed > 0 else float(self.in_flight),
                "max_accepted_per_window": self._max_accepted, "max_requests_per_window": self._max_arrived,
                "rate_limit": self.rate_limit, "rate_window": self.rate_window, "elapsed_seconds": elapsed,
                "windows": [{"start": index * self.rate_window, "accepted": n, "requests": arrived}
                            for index, n, arrived in self._windows]}

    def _admit(self) -> float | None:
        """Count a request in the current window; seconds until the window ends if it is over the limit."""
        offset = time.monotonic() - self._t0
        index = int(offset // self.rate_window)
        if not self._windows or self._windows[-1][0] != index:
            self._windows.append([index, 0, 0])
        window = self._windows[-1]
        window[2] += 1  # every request that arrived in the window, throttled or not
        self._max_arrived = max(self._max_arrived, window[2])
        if self.rate_limit is not None and window[1] >= self.rate_limit:
            return (index + 1) * self.rate_window - offset
        window[1] += 1
        self._max_accepted = max(self._max_accepted, window[1])
        return None

    async def listen(self, sock: socket.socket) -> asyncio.Server:
        """Start accepting connections on a bound, listening socket."""
        return await asyncio.start_server(self._connection, sock=sock)

    async def close(self, server: asyncio.Server) -> None:
        """Stop accepting, drop every open connection (hung requests included) and wait for the handlers."""
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = cast("asyncio.Task[Any]", asyncio.current_task())
        self._connections.add(task)
        self.counters["connections"] += 1  # TCP connections accepted (a client that keeps them alive opens few)
        try:
            while await self._request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or close() dropped the connection
        finally:
            self._connections.discard(task)
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, status: int, body: bytes, keep: bool,
                     extra: str = "") -> bool:
        if status >= 400 and status != 429:
            self.counters["errors"] += 1
        writer.write(_head(status, len(body), keep, extra) + body)
        await writer.drain()
        return keep

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; whether to keep the connection for the next one."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed the connection between requests
        except asyncio.LimitOverrunError:
            return await self._reply(writer, 400, _error("request head too large"), False)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return await self._reply(writer, 400, _error("malformed request line"), False)
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        if "transfer-encoding" in headers:
            return await self._reply(writer, 411, _error("send the request body with a Content-Length"), False)
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return await self._reply(writer, 400, _error("invalid Content-Length"), False)
        if length is None and method == "POST":
            return await self._reply(writer, 411, _error("Content-Length required"), False)
        body = await reader.readexactly(int(length)) if length else b""
        path = target.partition("?")[0]
        while path.startswith("/v1/"):  # base URLs with or without /v1: Anthropic's SDK adds its own
            path = path[3:]
        protocol = _PROTOCOLS.get(path)
        if method == "POST" and protocol is not None:
            return await self._chat(reader, writer, body, keep, protocol)
        if method == "GET" and path == "/health":
            return await self._reply(writer, 200, b'{"ok":true}', keep)
        if method == "GET" and path == "/stats":
            return await self._reply(writer, 200, _dumps(self.snapshot()).encode(), keep)
        if method == "POST" and path == "/reset":
            self.reset()
            return await self._reply(writer, 200, b'{"ok":true}', keep)
        return await self._reply(writer, 404, _error(f"no route for {method} {target}", code="not_found"), keep)

    async def _chat(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes,
                    keep: bool, protocol: str) -> bool:
        self.counters["requests"] += 1
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise TypeError("the request body is not a JSON object")
            answer = self._answer(protocol, request)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return await self._reply(writer, 400, _error("We could not parse the JSON body of your request."), keep)
        except (LookupError, TypeError, AttributeError, ValueError) as exc:  # not an object, bad tools, ...
            return await self._reply(writer, 400, _error(f"invalid request: {exc}"), keep)
        wait = self._admit()
        if wait is not None:
            self.counters["throttled"] += 1
            extra = f"retry-after: {max(1, math.ceil(wait))}\r\nretry-after-ms: {max(1, math.ceil(wait * 1000))}\r\n"
            return await self._reply(writer, 429, _RATE_LIMITED[protocol], keep, extra)
        model = self._directive(request) or str(request.get("model", ""))
        self._flight(1)
        try:
            if model == "hang":
                self.counters["hung"] += 1
                while await reader.read(65536):  # discard anything until the client disconnects
                    pass
                self.counters["disconnected"] += 1
                return False
            await asyncio.sleep(self._latency(model))
            writer.write(self._render(protocol, request, model, answer, len(body), keep))
            try:
                await writer.drain()
            except ConnectionError:
                self.counters["disconnected"] += 1
                return False
            self.counters["completed"] += 1
            return keep
        finally:
            self._flight(-1)

    @staticmethod
    def _directive(request: dict[str, Any]) -> str | None:
        """``hang`` or ``latency-<s>`` when the first user message asks for it (``[hang]``, ``[latency=<s>]``)."""
        for message in request.get("messages") or ():
            if not isinstance(message, dict) or message.get("role") != "user":
                continue
            content = message.get("content")
            text = content if isinstance(content, str) else " ".join(
                str(part.get("text", "")) for part in content or () if isinstance(part, dict))
            if "[hang]" in text:
                return "hang"
            found = _LATENCY_DIRECTIVE.search(text)
            return f"latency-{found.group(1)}" if found else None
        return None

    def _latency(self, model: str) -> float:
        if model.startswith("latency-"):
            try:
                return max(0.0, float(model[8:]))
            except ValueError:
                pass
        return self.latency

    def _answer(self, protocol: str, request: dict[str, Any]) -> tuple[str | None, str]:
        """(tool name, JSON arguments) for a tool call, or (None, text): the request in ``protocol``'s shapes."""
        messages = [m for m in request.get("messages") or () if isinstance(m, dict)]
        if protocol == "anthropic":
            tools = [{"name": t.get("name"), "parameters": t.get("input_schema")}
                     for t in request.get("tools") or () if isinstance(t, dict) and "input_schema" in t]
            choice = request.get("tool_choice") or {}
            kind = choice.get("type") if isinstance(choice, dict) else None
            forced = choice.get("name") if kind == "tool" else None
            results = sum(1 for m in messages if m.get("role") == "user" and isinstance(m.get("content"), list)
                          for block in m["content"] if isinstance(block, dict) and block.get("type") == "tool_result")
            output = ((request.get("output_config") or {}).get("format") or {})
            schema = output.get("schema") if output.get("type") == "json_schema" else None
            return self._choose(tools, forced, kind == "none", results, schema)
        tools = [t["function"] for t in request.get("tools") or () if isinstance(t, dict) and "function" in t]
        results = sum(1 for m in messages if m.get("role") == "tool")
        if protocol == "ollama":  # no tool choice; ``format`` (a JSON schema) constrains the text
            text_format = request.get("format")
            return self._choose(tools, None, False, results, text_format if isinstance(text_format, dict) else None)
        choice = request.get("tool_choice")
        forced = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        response_format = request.get("response_format") or {}
        schema = None
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            schema = response_format["json_schema"].get("schema") or {}
        return self._choose(tools, forced, choice == "none", results, schema)

    def _choose(self, tools: list[dict[str, Any]], forced: str | None, no_tools: bool, tool_results: int,
                text_schema: dict[str, Any] | None) -> tuple[str | None, str]:
        """What the "model" answers: the forced tool; else, while fewer than ``tool_calls`` tool results are in the
        conversation, the first tool not named ``final_outcome``; else ``final_outcome`` or the last tool; without
        tools (or told not to call one) a sample of ``text_schema``, or "ok"."""
        if not tools or no_tools:
            return None, self._sample("text", text_schema) if text_schema is not None else "ok"
        if forced is not None:
            tool = next((t for t in tools if t.get("name") == forced), None)
            if tool is None:
                raise LookupError(f"tool_choice names {forced!r}, which is not among the offered tools")
        else:
            tool = None
            if self.tool_calls > 0 and tool_results < self.tool_calls:
                tool = next((t for t in tools if t.get("name") != FINAL_TOOL), None)
            if tool is None:
                tool = next((t for t in tools if t.get("name") == FINAL_TOOL), tools[-1])
        name = str(tool.get("name", ""))
        return name, self._sample(name, tool.get("parameters") or {"type": "object", "properties": {}})

    def _sample(self, name: str, schema: dict[str, Any]) -> str:
        """A JSON document valid for ``schema``, sampled once per (name, schema)."""
        key = (name, _dumps(schema))
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            cached = self._cache[key] = _dumps(sample_output(schema))
        return cached

    def _render(self, protocol: str, request: dict[str, Any], model: str, answer: tuple[str | None, str],
                prompt_chars: int, keep: bool) -> bytes:
        """The full HTTP response in ``protocol``'s shapes: one JSON body, or the whole stream at once."""
        if answer[0] is not None:
            self.counters["tool_calls_emitted"] += 1
        tokens = max(1, prompt_chars // 4), max(1, len(answer[1]) // 4)  # (prompt, completion): ~4 characters each
        if protocol == "anthropic":
            return self._render_anthropic(request, model, answer, tokens, keep)
        if protocol == "ollama":
            return self._render_ollama(request, model, answer, tokens, keep)
        return self._render_openai(request, model, answer, tokens, keep)

    def _render_openai(self, request: dict[str, Any], model: str, answer: tuple[str | None, str],
                       tokens: tuple[int, int], keep: bool) -> bytes:
        n = next(self._ids)
        name, text = answer
        prompt, completion = tokens
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        base = {"id": f"chatcmpl-{n}", "created": int(time.time()), "model": model}
        finish = "stop" if name is None else "tool_calls"
        if not request.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": text if name is None else None}
            if name is not None:
                message["tool_calls"] = [{"id": f"call_{n}", "type": "function",
                                          "function": {"name": name, "arguments": text}}]
            completion_body = {**base, "object": "chat.completion", "usage": usage,
                               "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]}
            data = _dumps(completion_body).encode()
            return _head(200, len(data), keep) + data
        deltas: list[dict[str, Any]] = [{"role": "assistant"}]
        if name is None:
            deltas.append({"content": text})
        else:
            deltas.append({"tool_calls": [{"index": 0, "id": f"call_{n}", "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})
            deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": part}}]} for part in _halves(text)]
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [{**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        return _chunked(_SSE_HEAD, keep, [f"data: {_dumps(event)}\n\n".encode() for event in events]
                        + [b"data: [DONE]\n\n"])

    def _render_anthropic(self, request: dict[str, Any], model: str, answer: tuple[str | None, str],
                          tokens: tuple[int, int], keep: bool) -> bytes:
        n = next(self._ids)
        name, text = answer
        prompt, completion = tokens
        block: dict[str, Any] = ({"type": "text", "text": text} if name is None else
                                 {"type": "tool_use", "id": f"toolu_{n}", "name": name, "input": json.loads(text)})
        stop = "end_turn" if name is None else "tool_use"
        message = {"id": f"msg_{n}", "type": "message", "role": "assistant", "model": model, "content": [block],
                   "stop_reason": stop, "stop_sequence": None,
                   "usage": {"input_tokens": prompt, "output_tokens": completion}}
        if not request.get("stream"):
            data = _dumps(message).encode()
            return _head(200, len(data), keep) + data
        start = {**message, "content": [], "stop_reason": None, "usage": {"input_tokens": prompt, "output_tokens": 1}}
        if name is None:
            opening: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": text}]
        else:
            opening = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": part} for part in _halves(text)]
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": opening}),
            *(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}) for d in deltas),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": {"output_tokens": completion}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return _chunked(_SSE_HEAD, keep, [f"event: {kind}\ndata: {_dumps(event)}\n\n".encode()
                                          for kind, event in events])

    def _render_ollama(self, request: dict[str, Any], model: str, answer: tuple[str | None, str],
                       tokens: tuple[int, int], keep: bool) -> bytes:
        name, text = answer
        prompt, completion = tokens
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        message: dict[str, Any] = {"role": "assistant", "content": text if name is None else ""}
        if name is not None:
            message["tool_calls"] = [{"function": {"name": name, "arguments": json.loads(text)}}]
        last = {"model": model, "created_at": created, "message": {"role": "assistant", "content": ""}, "done": True,
                "done_reason": "stop", "total_duration": 1_000_000, "load_duration": 0, "prompt_eval_count": prompt,
                "prompt_eval_duration": 0, "eval_count": completion, "eval_duration": 0}
        if request.get("stream") is False:
            data = _dumps({**last, "message": message}).encode()
            return _head(200, len(data), keep) + data
        first = {"model": model, "created_at": created, "message": message, "done": False}
        return _chunked(_NDJSON_HEAD, keep, [f"{_dumps(first)}\n".encode(), f"{_dumps(last)}\n".encode()])


def _listen(host: str, port: int) -> tuple[socket.socket, str]:
    """A listening socket (a large backlog: benchmarks open 1000+ connections at once) and its base URL."""
    sock = socket.create_server((host, port), backlog=8192)
    port = sock.getsockname()[1]
    return sock, f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


class _Lifecycle:
    """Context-manager support shared by the in-process server and the subprocess."""

    url: str = ""

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ModelServer(_Lifecycle):
    """The server on its own event loop in a daemon thread of this process.

    Args:
        host: Interface to bind.
        port: Port to bind (0: any free port).
        latency: Seconds before each answer, unless the model name says ``latency-<seconds>``.
        tool_calls: Tool results the conversation must hold before ``final_outcome`` is called.
        rate_limit: Requests accepted per window (None: unlimited).
        rate_window: Length of a rate-limit window in seconds.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency: float = 1.0, tool_calls: int = 0,
                 rate_limit: int | None = None, rate_window: float = 60.0) -> None:
        self.host, self.port = host, port
        self._core = _Core(latency, tool_calls, rate_limit, rate_window)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Start serving; the base URL for an OpenAI client (``http://127.0.0.1:PORT/v1``)."""
        if self._thread is not None:
            return self.url
        sock, self.url = _listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        loop = self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                server = loop.run_until_complete(self._core.listen(sock))
            finally:
                ready.set()
            loop.run_forever()
            loop.run_until_complete(self._core.close(server))
            loop.close()

        self._thread = threading.Thread(target=run, name=f"model-server-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        return self.url

    def stop(self) -> None:
        """Close every connection (hung ones too) and stop the loop thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop, self._thread = None, None

    def _on_loop(self, fn: Callable[[], T]) -> T:
        if self._loop is None:
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(lambda: future.set_result(fn()))
        return future.result(timeout=30)

    def stats(self) -> dict[str, Any]:
        """The counters (the same JSON as ``GET /stats``)."""
        return self._on_loop(self._core.snapshot)

    def reset(self) -> None:
        """Zero the counters and start a fresh rate-limit window."""
        self._on_loop(self._core.reset)


class ModelServerProcess(_Lifecycle):
    """The server as a subprocess (``python -m bench.model_server``), so its CPU time can be measured apart.

    Takes the same keyword arguments as :class:`ModelServer`.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency: float = 1.0, tool_calls: int = 0,
                 rate_limit: int | None = None, rate_window: float = 60.0) -> None:
        self.argv = [sys.executable, "-m", "bench.model_server", "--host", host, "--port", str(port),
                     "--latency", repr(latency), "--tool-calls", str(tool_calls), "--rate-window", repr(rate_window)]
        self.argv += ["--rate-limit", str(rate_limit)] if rate_limit is not None else []
        self.process: subprocess.Popen[bytes] | None = None
        self._cpu = 0.0

    def start(self, timeout: float = 60.0) -> str:
        """Start the process and wait for the URL it prints; the base URL for an OpenAI client."""
        if self.process is not None:
            return self.url
        self.process = process = subprocess.Popen(self.argv, cwd=_REPO_ROOT, stdin=subprocess.DEVNULL,
                                                  stdout=subprocess.PIPE, start_new_session=True)
        assert process.stdout is not None
        line = process.stdout.readline() if select.select([process.stdout], [], [], timeout)[0] else b""
        if not line:
            self.stop()
            raise RuntimeError(f"model server did not start within {timeout} s (exit code {process.returncode})")
        self.url = str(json.loads(line)["url"])
        return self.url

    def _http(self, path: str, method: str = "GET") -> dict[str, Any]:
        request = urllib.request.Request(self.url.removesuffix("/v1") + path, method=method,
                                         data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=30) as response:
            data: dict[str, Any] = json.loads(response.read())
        return data

    def stats(self) -> dict[str, Any]:
        """The counters (``GET /stats``)."""
        return self._http("/stats")

    def reset(self) -> None:
        """Zero the counters and start a fresh rate-limit window (``POST /reset``)."""
        self._http("/reset", "POST")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process so far (the last reading once it stopped)."""
        from bench._common import cpu_seconds  # noqa: PLC0415 - the server process itself does not need it

        if self.process is not None and self.process.poll() is None:
            self._cpu = cpu_seconds(self.process.pid)  # the server starts no processes: its own CPU
        return self._cpu

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s) and wait for the process to exit."""
        process = self.process
        if process is None:
            return
        self.cpu_seconds()
        self.process = None
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


async def _serve(args: argparse.Namespace) -> None:
    sock, url = _listen(args.host, args.port)
    core = _Core(args.latency, args.tool_calls, args.rate_limit, args.rate_window)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    server = await core.listen(sock)
    print(json.dumps({"url": url}), flush=True)
    await stop.wait()
    await core.close(server)


def main(argv: list[str] | None = None) -> int:
    """Command line: print ``{"url": ...}`` on the first stdout line, then serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.model_server",
        description="Local model server for benchmarks and tests, speaking OpenAI's chat completions "
        "(/v1/chat/completions), Anthropic's messages (/v1/messages) and Ollama's chat (/api/chat). Prints "
        '{"url": "http://HOST:PORT/v1"} on the first stdout line, then serves until SIGTERM or SIGINT. The model '
        "name sets the latency: latency-<seconds> (e.g. latency-0.05); hang never answers; others use --latency.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default: 0)")
    parser.add_argument("--latency", type=float, default=1.0, help="seconds before each answer (default: 1.0)")
    parser.add_argument("--tool-calls", type=int, default=0, metavar="N",
                        help=f"call the first tool not named {FINAL_TOOL} until the conversation holds N tool "
                        f"results, then {FINAL_TOOL} (default: 0)")
    parser.add_argument("--rate-limit", type=int, metavar="R", help="accept at most R requests per window; "
                        "answer the rest 429 at once (default: no limit)")
    parser.add_argument("--rate-window", type=float, default=60.0, metavar="W",
                        help="rate-limit window in seconds (default: 60)")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # every concurrent connection takes a descriptor
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
