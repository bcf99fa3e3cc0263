"""bench/model_server.py: the local model server, driven by the real openai, anthropic and ollama SDKs and strands."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field
from strands import Agent, tool
from strands.models.openai import OpenAIModel

from bench.model_server import ModelServer, ModelServerProcess
from teamster.agents.outcomes import outcome_envelope


class Answer(BaseModel):
    """The answer."""

    title: str = Field(min_length=3)
    score: int = Field(ge=1, le=5)
    tags: list[str] = Field(min_length=1)
    mood: Literal["calm", "busy"]


class Envelope(BaseModel):
    """Call this once, last."""

    status: Literal["succeeded", "cannot_complete"]
    output: Answer


USER: list[Any] = [{"role": "user", "content": "hi"}]


def function_tool(name: str, schema: dict[str, Any]) -> Any:
    return {"type": "function", "function": {"name": name, "description": name, "parameters": schema}}


LOOKUP = function_tool("lookup", {"type": "object", "properties": {"order_id": {"type": "string"}},
                                  "required": ["order_id"]})
FINAL = function_tool("final_outcome", Envelope.model_json_schema())


@pytest.fixture()
def server() -> Iterator[ModelServer]:
    with ModelServer(latency=0.01) as srv:
        yield srv


def client(url: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, **kwargs)


def test_streamed_tool_call_is_valid_for_the_schema(server: ModelServer) -> None:
    async def run() -> tuple[list[Any], str, str]:
        async with client(server.url) as api:
            stream = await api.chat.completions.create(
                model="latency-0.01", messages=USER, tools=[LOOKUP, FINAL], stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
        names = "".join(tc.function.name or "" for c in chunks if c.choices
                        for tc in c.choices[0].delta.tool_calls or () if tc.function)
        arguments = "".join(tc.function.arguments or "" for c in chunks if c.choices
                            for tc in c.choices[0].delta.tool_calls or () if tc.function)
        return chunks, names, arguments

    chunks, name, arguments = asyncio.run(run())
    assert name == "final_outcome"
    envelope = Envelope.model_validate_json(arguments)
    assert envelope.status == "succeeded"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.tool_calls) >= 2
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens >= 2
    stats = server.stats()
    assert (stats["requests"], stats["completed"], stats["tool_calls_emitted"], stats["in_flight"]) == (1, 1, 1, 0)


def test_forced_tool_choice_and_plain_text(server: ModelServer) -> None:
    async def run() -> tuple[Any, Any]:
        async with client(server.url) as api:
            forced = await api.chat.completions.create(
                model="latency-0", messages=USER, tools=[LOOKUP, FINAL],
                tool_choice={"type": "function", "function": {"name": "lookup"}},
            )
            text = await api.chat.completions.create(model="latency-0", messages=USER)
        return forced, text

    forced, text = asyncio.run(run())
    call = forced.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("lookup", {"order_id": "sample"})
    assert forced.choices[0].finish_reason == "tool_calls"
    assert (text.choices[0].message.content, text.choices[0].finish_reason) == ("ok", "stop")


@pytest.mark.parametrize("output_model", [Answer, outcome_envelope(Answer)], ids=["plain", "teamster-envelope"])
def test_strands_structured_output_end_to_end(server: ModelServer, output_model: type[BaseModel]) -> None:
    async def run() -> Any:
        async with client(server.url) as api:
            agent = Agent(model=OpenAIModel(client=api, model_id="latency-0.01"),
                          structured_output_model=output_model, callback_handler=None)
            return await agent.invoke_async("hi")

    result = asyncio.run(run())
    assert isinstance(result.structured_output, output_model)
    output_model.model_validate(result.structured_output.model_dump())
    assert server.stats()["completed"] >= 1


def test_strands_agent_calls_its_tool_then_finishes() -> None:
    seen: list[str] = []

    @tool
    def lookup(order_id: str) -> str:
        """Look an order up.

        Args:
            order_id: The order.
        """
        seen.append(order_id)
        return "shipped"

    async def run() -> Any:
        async with client(srv.url) as api:
            agent = Agent(model=OpenAIModel(client=api, model_id="latency-0"), tools=[lookup],
                          structured_output_model=outcome_envelope(Answer), callback_handler=None)
            return await agent.invoke_async("where is my order?")

    with ModelServer(latency=0.01, tool_calls=1) as srv:
        result = asyncio.run(run())
        stats = srv.stats()
    assert seen == ["sample"]
    assert result.structured_output.status == "succeeded"
    assert (stats["completed"], stats["tool_calls_emitted"]) == (2, 2)


def test_tool_calls_setting_calls_the_other_tool_first() -> None:
    async def run(url: str) -> tuple[Any, Any]:
        async with client(url) as api:
            first = await api.chat.completions.create(model="latency-0", messages=USER, tools=[FINAL, LOOKUP])
            calls: Any = first.choices[0].message.tool_calls
            call = calls[0]
            history = [*USER, first.choices[0].message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": "shipped"}]
            second = await api.chat.completions.create(model="latency-0", messages=history, tools=[FINAL, LOOKUP])
        return first, second

    with ModelServer(latency=0.01, tool_calls=1) as srv:
        first, second = asyncio.run(run(srv.url))
    assert first.choices[0].message.tool_calls[0].function.name == "lookup"
    assert second.choices[0].message.tool_calls[0].function.name == "final_outcome"
    Envelope.model_validate_json(second.choices[0].message.tool_calls[0].function.arguments)


def test_rate_limit_answers_429_like_openai() -> None:
    async def run(url: str) -> openai.RateLimitError:
        async with client(url) as api:
            for _ in range(2):
                await api.chat.completions.create(model="latency-0", messages=USER)
            with pytest.raises(openai.RateLimitError) as info:
                await api.chat.completions.create(model="latency-0", messages=USER)
        return info.value

    with ModelServer(latency=0.01, rate_limit=2, rate_window=30) as srv:
        error = asyncio.run(run(srv.url))
        stats = srv.stats()
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert 1 <= int(error.response.headers["retry-after"]) <= 30
    assert 0 < int(error.response.headers["retry-after-ms"]) <= 30_000
    assert (stats["requests"], stats["completed"], stats["throttled"]) == (3, 2, 1)
    assert stats["max_accepted_per_window"] == 2
    assert stats["max_requests_per_window"] == 3
    assert stats["windows"] == [{"start": 0.0, "accepted": 2, "requests": 3}]


def test_hang_never_answers_and_is_counted(server: ModelServer) -> None:
    async def run() -> None:
        async with client(server.url, timeout=httpx.Timeout(0.5)) as api:
            with pytest.raises(openai.APITimeoutError):
                await api.chat.completions.create(model="hang", messages=USER)

    asyncio.run(run())
    assert server.stats()["hung"] == 1
    with httpx.Client(base_url=server.url.removesuffix("/v1"), timeout=10) as http:
        for _ in range(200):  # the server sees the client's disconnect shortly after the timeout
            if http.get("/stats").json()["in_flight"] == 0:
                break
            time.sleep(0.05)
        stats = http.get("/stats").json()
    assert (stats["in_flight"], stats["completed"], stats["disconnected"]) == (0, 0, 1)


def test_http_errors_health_and_reset(server: ModelServer) -> None:
    with httpx.Client(base_url=server.url.removesuffix("/v1"), timeout=10) as http:
        assert http.get("/health").json() == {"ok": True}
        bad = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        missing = http.get("/v1/models")
        assert missing.status_code == 404 and "error" in missing.json()
        assert http.get("/stats").json()["errors"] == 2
        assert http.post("/reset").json() == {"ok": True}
        assert http.get("/stats").json()["errors"] == 0
    host, port = server.host, server.port
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 411 ")


def test_bench_strands_step_is_one_model_call_with_a_structured_output(server: ModelServer) -> None:
    """The strands floor and the Celery + strands floor (bench.bench_workflows.strands_step) count model calls
    the server completed as steps: each call of the step must be exactly one model call, and end structured."""
    from bench.bench_workflows import strands_step  # noqa: PLC0415 - bench's own module, as the floors use it

    async def run() -> None:
        async with client(server.url) as api:
            step = strands_step(api, "latency-0.01")
            await asyncio.gather(*(step() for _ in range(5)))  # raises if a step ends without its output

    asyncio.run(run())
    stats = server.stats()
    assert (stats["requests"], stats["completed"], stats["errors"]) == (5, 5, 0)


def test_server_process_serves_and_stops() -> None:
    with ModelServerProcess(latency=0.01) as proc:
        assert proc.url.startswith("http://127.0.0.1:") and proc.url.endswith("/v1")
        with urllib.request.urlopen(proc.url.removesuffix("/v1") + "/health", timeout=10) as response:
            assert json.loads(response.read()) == {"ok": True}
        with openai.OpenAI(base_url=proc.url, api_key="unused", max_retries=0) as api:
            reply = api.chat.completions.create(model="latency-0", messages=USER)
        assert reply.choices[0].message.content == "ok"
        assert (proc.stats()["requests"], proc.stats()["completed"]) == (1, 1)
        proc.reset()
        assert proc.stats()["requests"] == 0
        assert proc.cpu_seconds() > 0
        process = proc.process
        assert process is not None
    assert process.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(process.pid, 0)


# --------------------------------------------------------------------------- Anthropic's and Ollama's APIs
# (each SDK is an optional extra: imported per test)

def test_anthropic_messages_stream_a_tool_call_and_answer_text_schemas(server: ModelServer) -> None:
    sdk = pytest.importorskip("anthropic")
    final = {"name": "final_outcome", "description": "last", "input_schema": Envelope.model_json_schema()}

    async def run() -> tuple[Any, Any]:
        async with sdk.AsyncAnthropic(base_url=server.url.removesuffix("/v1"), api_key="unused",
                                      max_retries=0) as api:
            async with api.messages.stream(model="latency-0.01", max_tokens=100, messages=USER,
                                           tools=[final], tool_choice={"type": "any"}) as stream:
                streamed = await stream.get_final_message()
            forced_text = await api.messages.create(
                model="latency-0", max_tokens=100, messages=USER, tools=[final], tool_choice={"type": "none"},
                extra_body={"output_config": {"format": {"type": "json_schema",
                                                         "schema": Answer.model_json_schema()}}})
        return streamed, forced_text

    streamed, text = asyncio.run(run())
    block = streamed.content[0]
    assert (block.type, block.name, streamed.stop_reason) == ("tool_use", "final_outcome", "tool_use")
    assert Envelope.model_validate(block.input).status == "succeeded"
    assert streamed.usage.input_tokens >= 1 and streamed.usage.output_tokens >= 1
    assert text.stop_reason == "end_turn"
    Answer.model_validate_json(text.content[0].text)  # the text follows the schema the request asked for


def test_anthropic_429_is_the_sdks_rate_limit_error() -> None:
    sdk = pytest.importorskip("anthropic")

    async def run() -> None:
        async with sdk.AsyncAnthropic(base_url=srv.url, api_key="unused", max_retries=0) as api:  # /v1 prefix ok
            await api.messages.create(model="latency-0", max_tokens=10, messages=USER)
            with pytest.raises(sdk.RateLimitError) as info:
                await api.messages.create(model="latency-0", max_tokens=10, messages=USER)
            assert info.value.status_code == 429 and info.value.body["error"]["type"] == "rate_limit_error"

    with ModelServer(latency=0, rate_limit=1, rate_window=60) as srv:
        asyncio.run(run())
        assert srv.stats()["throttled"] == 1


def test_ollama_chat_streams_a_tool_call_and_follows_format(server: ModelServer) -> None:
    sdk = pytest.importorskip("ollama")
    lookup = {"type": "function", "function": LOOKUP["function"]}

    async def run() -> tuple[list[Any], Any]:
        api = sdk.AsyncClient(server.url.removesuffix("/v1"))
        chunks = [part async for part in await api.chat(model="latency-0.01", messages=USER, tools=[lookup],
                                                         stream=True)]
        formatted = await api.chat(model="latency-0", messages=USER, format=Answer.model_json_schema())
        return chunks, formatted

    chunks, formatted = asyncio.run(run())
    calls = [call for chunk in chunks for call in chunk.message.tool_calls or ()]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("lookup", {"order_id": "sample"})]
    assert chunks[-1].done and chunks[-1].eval_count >= 1 and chunks[-1].prompt_eval_count >= 1
    Answer.model_validate_json(formatted.message.content)
