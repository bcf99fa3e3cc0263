"""Workflows, scripted agents and raw-Celery baseline tasks used by the benchmarks.

Workers import this module through ``TEAMSTER_WORKFLOW_MODULES=bench.bench_workflows`` (the benchmarks set it),
so teamster steps and the raw baseline tasks run in the same worker processes with identical settings: JSON
only, ``acks_late``, prefetch off, the same pool and concurrency, the same steps queue.

* ``bench_linear5``: five agent steps in a line (``s1`` -> ... -> ``s5``); each step is one scripted model call
  producing a tiny structured output.
* ``bench_single``: one agent step (``work``); the benchmarks set the model latency per worker with
  ``TEAMSTER_SCRIPTED_LATENCY`` (I/O-bound steps).
* ``bench.noop``: the raw Celery baseline -- a task that does nothing but return the time it ran
  (``time.time()``), chained five at a time with ``celery.chain`` and the Redis result backend.
* ``bench.sdk_call``: the provider benchmark's Celery floor -- one bare SDK request (the one strands would send) on
  the worker's agent loop with the shared ``AsyncOpenAI`` client, no result stored (as a step stores none): Celery
  and the SDK, without strands and without teamster's run store.
* ``bench.agent_call``: the provider benchmark's Celery + strands floor -- one fresh strands ``Agent`` per task
  (:func:`strands_step`: the prompt, structured output and settings of a step of ``bench_agent``) on the worker's
  agent loop, with the shared client, no result stored: the two parts a teamster step keeps (Celery as the unit of
  delivery, a fresh ``Agent`` per step) without teamster's run store, journal, gate or leases.

The raw task is declared with ``shared_task`` so it attaches to whichever Celery app the process uses: in a
worker that is ``teamster.tasks.app.app`` (the steps queue is its default queue), in the benchmark process the
producer app that sends the chains. Importing this module therefore never builds ``teamster.tasks.app`` by itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from celery import shared_task
from pydantic import BaseModel, Field

from teamster.agents.scripted import ScriptContext, Turn, finish, register_script
from teamster.agents.spec import AgentSpec, Budget
from teamster.orchestrator.workflow import Workflow
from teamster.testing import record_model_calls

__all__ = [
    "BenchInput",
    "Tick",
    "BENCH_AGENT",
    "LINEAR_WORKFLOW",
    "LINEAR_STEPS",
    "SINGLE_WORKFLOW",
    "SINGLE_STEP",
    "NOOP_TASK",
    "SDK_TASK",
    "AGENT_TASK",
    "sdk_call",
    "agent_call",
    "strands_step",
    "noop",
    "bench_agent",
    "linear5",
    "single",
]

BENCH_AGENT = "bench_agent"
LINEAR_WORKFLOW = "bench_linear5"
LINEAR_STEPS = ("s1", "s2", "s3", "s4", "s5")
SINGLE_WORKFLOW = "bench_single"
SINGLE_STEP = "work"
NOOP_TASK = "bench.noop"
SDK_TASK = "bench.sdk_call"
AGENT_TASK = "bench.agent_call"


class BenchInput(BaseModel):
    """Input of every benchmark run (a short text, so prompts stay tiny)."""

    text: str = Field(default="bench", max_length=200)


class Tick(BaseModel):
    """The tiny structured output of one benchmark step."""

    ok: bool
    n: int


def _script(ctx: ScriptContext) -> Turn:
    """One model call per step: the final structured outcome right away."""
    return finish({"ok": True, "n": ctx.call_index})


register_script(BENCH_AGENT, _script)
if os.environ.get("TEAMSTER_BENCH_COUNT_MODEL_CALLS"):
    # recovery and scaling read how many model calls workers made (teamster.testing.model_calls_key); the others
    # leave it off, so its Redis command is not counted as teamster's
    record_model_calls()

bench_agent: AgentSpec[BenchInput, Tick] = AgentSpec(
    name=BENCH_AGENT,
    input_model=BenchInput,
    output_model=Tick,
    instructions="Benchmark agent: answer with the outcome right away.",
    budget=Budget(max_model_calls=2, max_tool_calls=0),
)

linear5 = Workflow(LINEAR_WORKFLOW, input_model=BenchInput)
_previous: str | None = None
for _step in LINEAR_STEPS:
    linear5.step(_step, bench_agent, after=_previous)
    _previous = _step
linear5.register()

single = Workflow(SINGLE_WORKFLOW, input_model=BenchInput)
single.step(SINGLE_STEP, bench_agent)
single.register()


@shared_task(name=NOOP_TASK)  # type: ignore[untyped-decorator]  # celery ships no type hints
def noop(previous: Any = None) -> float:
    """The raw Celery baseline step: no work; returns when it ran (``time.time()``) for latency accounting."""
    return time.time()


@shared_task(name=SDK_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def sdk_call(request: dict[str, Any]) -> None:
    """The Celery floor's task: send ``request`` (a chat completion, streamed) with the worker's shared
    ``AsyncOpenAI`` on its agent loop and read the stream to its end.

    It stores no result, as teamster's step task stores none (with ``task_track_started`` a result would cost two
    backend writes per task, STARTED and SUCCESS, that a step never pays); the benchmark counts the calls the model
    server completed in its window instead."""
    from teamster.agents.loop import AgentLoop  # noqa: PLC0415 - only workers running the floor need these
    from teamster.agents.providers import shared_openai_client  # noqa: PLC0415
    from teamster.config.settings import get_settings  # noqa: PLC0415

    async def call() -> None:
        stream = await shared_openai_client(get_settings()).chat.completions.create(**request)
        async for _chunk in stream:
            pass

    AgentLoop.shared().submit(call()).result()


def strands_step(client: Any, model_id: str) -> Callable[[], Awaitable[None]]:
    """One strands step as teamster builds it, without teamster: a fresh ``Agent`` per call on the shared client and
    one shared ``OpenAIModel`` (as a worker shares it per loop), the same prompt, envelope and settings (no retry
    strategy, no conversation manager, no callbacks). Used by the strands floor (its own asyncio process) and by the
    Celery + strands floor (:func:`agent_call`, on a worker's agent loop)."""
    from strands import Agent  # noqa: PLC0415 - only the floors need strands' classes here
    from strands.agent.conversation_manager import NullConversationManager  # noqa: PLC0415
    from strands.models.openai import OpenAIModel  # noqa: PLC0415

    from teamster.agents.outcomes import outcome_envelope  # noqa: PLC0415

    envelope = outcome_envelope(bench_agent.output_model)
    prompt = f"Input ({BenchInput.__name__}, JSON):\n{BenchInput(text='bench').model_dump_json()}"
    model = OpenAIModel(client=client, model_id=model_id, params={"max_tokens": 4096})

    async def call() -> None:
        agent = Agent(model=model,
                      system_prompt=bench_agent.instructions, structured_output_model=envelope, callback_handler=None,
                      conversation_manager=NullConversationManager(), retry_strategy=None)
        result = await agent.invoke_async(prompt, limits={"turns": bench_agent.budget.max_model_calls})
        if result.structured_output is None:
            raise RuntimeError("the strands step finished without a structured output")

    return call


_STEPS: dict[tuple[int, str], Callable[[], Awaitable[None]]] = {}


@shared_task(name=AGENT_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def agent_call(model_id: str) -> None:
    """The Celery + strands floor's task: one fresh strands ``Agent`` (:func:`strands_step`) on the worker's agent
    loop with its shared ``AsyncOpenAI`` client, the model ``model_id`` of the benchmark's model server. Like
    :func:`sdk_call` it stores no result; the benchmark counts the calls the server completed."""
    from teamster.agents.loop import AgentLoop  # noqa: PLC0415 - only workers running the floor need these
    from teamster.agents.providers import shared_openai_client  # noqa: PLC0415
    from teamster.config.settings import get_settings  # noqa: PLC0415

    loop = AgentLoop.shared()

    async def call() -> None:
        client = shared_openai_client(get_settings())  # the loop's own client (built on first use, on the loop)
        key = (id(client), model_id)
        if key not in _STEPS:  # only the loop thread touches it: no lock
            _STEPS[key] = strands_step(client, model_id)
        await _STEPS[key]()

    loop.submit(call()).result()
