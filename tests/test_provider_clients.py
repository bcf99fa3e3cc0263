"""The shared provider clients: real HTTP to the local model server of ``bench/model_server.py``.

On a worker's agent loop the OpenAI, Anthropic and Ollama pools run on aiohttp and keep their streamed connections
alive (the openai SDK on its default httpx client closes every streamed response before its last bytes, so httpcore
drops the connection and the next call opens a new one); each pool holds at most ``model_max_connections``; on an
application's own loop the pools are httpx's; at exit the agent loop closes what it shared, so no "unclosed" warning
is left behind; asking for aiohttp without it installed is a clear error; a call that never answers ends by the
step's deadline on every HTTP provider.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from bench.model_server import ModelServer
from teamster.agents import providers
from teamster.agents.loop import AgentLoop
from teamster.agents.outcomes import Failed, Succeeded
from teamster.agents.runner import run_agent, run_agent_async
from teamster.agents.spec import AgentSpec
from teamster.config.settings import load_settings
from teamster.errors import MissingExtra

pytestmark = pytest.mark.skipif(not providers.aiohttp_available(), reason="teamster[openai] is not installed")


class Question(BaseModel):
    text: str


class Reply(BaseModel):
    text: str


SPEC: AgentSpec[Question, Reply] = AgentSpec(name="clients_agent", instructions="Answer the question.",
                                             input_model=Question, output_model=Reply)


def _has(module: str) -> bool:
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec(module) is not None


HTTP_KINDS = [pytest.param(kind, marks=pytest.mark.skipif(not _has(kind), reason=f"teamster[{kind}] is not installed"))
              for kind in ("openai", "anthropic", "ollama")]
"""The providers whose pools teamster shares on the agent loop, each skipped when its extra is not installed."""


@pytest.fixture(autouse=True)
def _anthropic_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")  # check_provider wants one; the local server ignores it


@pytest.fixture()
def server() -> Iterator[ModelServer]:
    with ModelServer(latency=0.01) as model_server:  # a fresh server: its connection counter starts at 0
        yield model_server


def test_steps_on_the_agent_loop_share_one_kept_alive_connection(server: ModelServer) -> None:
    settings = load_settings(model="openai:default", model_base_url=server.url)
    for i in range(5):
        run = run_agent(SPEC, {"text": f"question {i}"}, settings=settings)
        assert isinstance(run.outcome, Succeeded), run.outcome
        assert run.live_model_calls == 1
    stats = server.stats()
    assert stats["completed"] == 5
    assert stats["connections"] == 1  # one connection, kept alive across five streamed calls


def test_steps_on_the_agent_loop_share_one_openai_model_per_budget(server: ModelServer) -> None:
    """strands' ``OpenAIModel`` keeps only its config and client: one per loop, model id and budget (building one
    validates its config through ``typing.get_type_hints``), a new one for another budget or model id."""
    settings = load_settings(model="openai:default", model_base_url=server.url)

    def build(model: str, timeout: float) -> Any:
        return providers.build_model(model, settings, agent=SPEC.name, timeout=timeout)

    async def on_loop() -> list[Any]:
        return [build("openai:default", 5), build("openai:default", 5), build("openai:default", 9),
                build("openai:other", 5)]

    first, again, longer, other = AgentLoop.shared().submit(on_loop()).result(timeout=30)
    assert again is first
    assert longer is not first and longer.get_config()["params"]["timeout"] == 9
    assert other is not first and other.get_config()["model_id"] == "other"
    for i in range(2):  # and a shared model serves step after step
        assert isinstance(run_agent(SPEC, {"text": f"q{i}"}, settings=settings).outcome, Succeeded)


def test_closed_clients_are_built_again_by_the_next_step(server: ModelServer) -> None:
    settings = load_settings(model="openai:default", model_base_url=server.url)
    assert isinstance(run_agent(SPEC, {"text": "before"}, settings=settings).outcome, Succeeded)
    AgentLoop.shared().close_clients()
    assert isinstance(run_agent(SPEC, {"text": "after"}, settings=settings).outcome, Succeeded)
    assert server.stats()["connections"] == 2  # the closed pool's connection is gone; a new client opened one


def test_the_httpx_setting_keeps_the_sdk_default_client(server: ModelServer) -> None:
    settings = load_settings(model="openai:default", model_base_url=server.url, model_http_client="httpx")
    for i in range(2):
        assert isinstance(run_agent(SPEC, {"text": f"q{i}"}, settings=settings).outcome, Succeeded)
    assert server.stats()["completed"] == 2


def test_a_step_on_an_applications_own_loop_uses_the_sdk_default(server: ModelServer) -> None:
    settings = load_settings(model="openai:default", model_base_url=server.url)

    async def main() -> tuple[bool, object]:
        owned = AgentLoop.owns_running_loop()
        run = await run_agent_async(SPEC, {"text": "from my own loop"}, settings=settings)
        return owned, run.outcome

    owned, outcome = asyncio.run(main())
    assert owned is False
    assert isinstance(outcome, Succeeded), outcome


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_a_process_that_ran_steps_exits_without_unclosed_client_warnings(kind: str, server: ModelServer) -> None:
    # (Ollama's steps end rejected -- see the Ollama test below -- but their calls went over the shared pool)
    script = textwrap.dedent(f"""
        import asyncio, warnings
        warnings.simplefilter("always", ResourceWarning)
        from tests.test_provider_clients import SPEC
        from teamster.agents.providers import aclose_shared_clients
        from teamster.agents.runner import run_agent, run_agent_async
        from teamster.config.settings import load_settings
        settings = load_settings(model="{kind}:default", model_base_url={server.url!r})
        for i in range(3):
            assert run_agent(SPEC, {{"text": str(i)}}, settings=settings).live_model_calls >= 1

        async def application():  # its own loop: it closes what its steps shared when it shuts down (README)
            run = await run_agent_async(SPEC, {{"text": "own loop"}}, settings=settings)
            await aclose_shared_clients()
            return run

        assert asyncio.run(application()).live_model_calls >= 1
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "nclosed" not in done.stderr, done.stderr  # "Unclosed client session", "Unclosed connector"
    assert server.stats()["errors"] == 0


def test_asking_for_aiohttp_without_it_is_a_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "aiohttp_available", lambda: False)
    settings = load_settings(model="openai:default", model_base_url="http://127.0.0.1:9/v1",
                             model_http_client="aiohttp")
    with pytest.raises(MissingExtra) as info:
        providers.check_provider("openai:default", settings)
    assert "aiohttp" in info.value.message and info.value.hint and "teamster[openai]" in info.value.hint
    # "auto" falls back to the SDK's default client instead
    providers.check_provider("openai:default", load_settings(model_base_url="http://127.0.0.1:9/v1"))


# --------------------------------------------------------------------------- Anthropic and Ollama

@pytest.mark.skipif(not _has("anthropic"), reason="teamster[anthropic] is not installed")
def test_anthropic_steps_share_one_kept_alive_connection(server: ModelServer) -> None:
    settings = load_settings(model="anthropic:claude-test", model_base_url=server.url)
    for i in range(3):
        run = run_agent(SPEC, {"text": f"question {i}"}, settings=settings)
        assert isinstance(run.outcome, Succeeded), run.outcome
        assert run.live_model_calls == 1
        assert run.usage["totalTokens"] > 0  # the stream's usage reached the step
    stats = server.stats()
    assert stats["completed"] == 3 and stats["errors"] == 0
    assert stats["connections"] == 1  # the shared AsyncAnthropic's pool kept its connection


@pytest.mark.skipif(not _has("ollama"), reason="teamster[ollama] is not installed")
def test_ollama_requests_share_the_loops_connection_pool(server: ModelServer) -> None:
    # strands builds an ollama.AsyncClient per request; each runs on the loop's shared transport. (The step cannot
    # succeed here: the ollama client drops nested object schemas from tool specs, ollama/ollama-python#724, and this
    # server's "model" answers from the tool's schema alone -- a real one also reads the schema teamster puts in the
    # system prompt, see the last test -- so every outcome is rejected; the connections are what is measured.)
    settings = load_settings(model="ollama:llama-test", model_base_url=server.url)
    for i in range(2):
        run = run_agent(SPEC, {"text": f"question {i}"}, settings=settings)
        assert run.live_model_calls == SPEC.budget.max_model_calls
    stats = server.stats()
    assert stats["completed"] == 2 * SPEC.budget.max_model_calls and stats["errors"] == 0
    assert stats["connections"] == 1  # before: a new httpx client, pool and connection per request


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_the_shared_pool_holds_at_most_model_max_connections(kind: str) -> None:
    AgentLoop.shared().close_clients()  # pools built by earlier tests had other sizes
    with ModelServer(latency=0.3) as slow:
        settings = load_settings(model=f"{kind}:pool-test", model_base_url=slow.url, model_max_connections=3)
        spec = dataclasses.replace(SPEC, budget=SPEC.budget.model_copy(update={"max_model_calls": 1}))

        async def many() -> list[object]:
            return list(await asyncio.gather(*(run_agent_async(spec, {"text": str(i)}, settings=settings)
                                               for i in range(9))))

        runs = AgentLoop.shared().submit(many()).result(timeout=120)
        assert all(run.live_model_calls == 1 for run in runs)  # type: ignore[attr-defined]
        stats = slow.stats()
    AgentLoop.shared().close_clients()
    assert stats["completed"] == 9
    assert stats["connections"] <= 3 and stats["in_flight_max"] <= 3  # nine steps queued for three connections


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_a_call_that_never_answers_ends_by_the_steps_deadline_on_every_http_provider(
        kind: str, server: ModelServer) -> None:
    settings = load_settings(model=f"{kind}:hang-test", model_base_url=server.url)
    spec = dataclasses.replace(SPEC, budget=SPEC.budget.model_copy(update={"timeout_seconds": 2}))
    # a first step imports the SDK and builds the pool (in a cold process that alone can take a short budget)
    assert isinstance(run_agent(spec, {"text": "warm up"}, settings=settings).outcome, Succeeded | Failed)
    run = run_agent(spec, {"text": "anyone there? [hang]"}, settings=settings)
    assert run.outcome.kind == "failed" and run.outcome.error_type == "step_timeout", run.outcome
    assert run.outcome.retryable
    assert run.duration_seconds < 2 + 5  # by the budget and its grace, not the SDK's read timeout (10 min)
    assert server.stats()["hung"] == 1


@pytest.mark.skipif(not _has("ollama"), reason="teamster[ollama] is not installed")
def test_an_ollama_step_gets_the_output_schema_in_its_system_prompt(server: ModelServer,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # the ollama client drops nested tool schemas (see above): the model must learn the output's fields elsewhere
    import bench.model_server as model_server  # noqa: PLC0415

    requests: list[tuple[str, dict[str, object]]] = []
    answer = model_server._Core._answer

    def spy(core: object, protocol: str, request: dict[str, object]) -> object:
        requests.append((protocol, request))
        return answer(core, protocol, request)  # type: ignore[arg-type]

    monkeypatch.setattr(model_server._Core, "_answer", spy)
    spec = dataclasses.replace(SPEC, budget=SPEC.budget.model_copy(update={"max_model_calls": 1}))
    for kind in ("ollama", "openai"):
        run_agent(spec, {"text": "q"}, settings=load_settings(model=f"{kind}:schema-test", model_base_url=server.url))
    system = {protocol: request["messages"][0] for protocol, request in requests}  # type: ignore[index]
    assert system["ollama"]["role"] == "system"
    hint = system["ollama"]["content"].removeprefix(SPEC.instructions)
    assert hint != system["ollama"]["content"] and "final_outcome" in hint
    assert json.dumps(Reply.model_json_schema(), separators=(",", ":")) in hint
    assert system["openai"]["content"] == SPEC.instructions  # the full schema reaches OpenAI in the tool
