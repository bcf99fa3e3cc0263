"""Delegation (issue 15, part 1): an agent calls other registered agents, each call a durable sub-call of its step.

* in-process (WorkflowEnvironment): the delegate's outcome comes back as a typed tool result (succeeded,
  needs_human, cannot_complete, failed) and is journaled as a nested step; its tokens count against the caller's
  budget and its model calls against the run's; a retryable failure of the delegate ends the caller's attempt with
  that error and the retry reuses the delegations that finished; replay serves them with zero model calls;
  definition errors (self-delegation, cycles, unknown delegates) are refused.
* real worker processes: a worker killed in the middle of a delegated call -- the survivor resumes the delegate from
  the answers it recorded; a worker killed after the delegation was recorded -- the survivor reuses it whole.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from teamster import AgentSpec, Budget, RetryPolicy, RunBudget, Workflow, register_agent
from teamster.config.settings import load_settings
from teamster.errors import ConfigurationError, WorkflowDefinitionError
from teamster.orchestrator.client import Client
from teamster.orchestrator.watchdog import Watchdog
from teamster.testing import (
    ScriptContext,
    Turn,
    WorkflowEnvironment,
    call,
    finish,
    model_calls_key,
    needs_human,
    throttle,
)
from tests.harness import Worker, wait_until

pytestmark = pytest.mark.integration


class Question(BaseModel):
    question: str


class Answer(BaseModel):
    answer: str


def _pair(delegate_budget: Budget | None = None, caller_budget: Budget | None = None,
          run_budget: RunBudget | None = None) -> tuple[Workflow, str, str]:
    """A supervisor step delegating to a specialist, with fresh names: (workflow, supervisor, specialist)."""
    suffix = uuid.uuid4().hex[:6]
    specialist = register_agent(AgentSpec(name=f"spec_{suffix}", input_model=Question, output_model=Answer,
                                          instructions="Answer the question.", budget=delegate_budget or Budget()))
    supervisor = AgentSpec(name=f"sup_{suffix}", input_model=Question, output_model=Answer,
                           instructions="Ask the specialist, then answer.", delegates=(specialist.name,),
                           budget=caller_budget or Budget(), retry=RetryPolicy(max_attempts=2, backoff_base=0.01))
    wf = Workflow(f"deleg_{suffix}", input_model=Question, budget=run_budget)
    wf.step("lead", supervisor)
    wf.register()
    return wf, supervisor.name, specialist.name


def _ask(specialist: str, then: Callable[[dict[str, Any]], Turn] | None = None) -> Callable[[ScriptContext], Turn]:
    """A supervisor script: ask the specialist (the run's question), then answer from its result."""
    def script(ctx: ScriptContext) -> Turn:
        if not ctx.tool_results:
            return call(f"ask_{specialist}", question=str(ctx.input_json().get("question")))
        result = json.loads(ctx.tool_results[-1])
        if then is not None:
            return then(result)
        return finish({"answer": f"{result['status']}: {result.get('output', {}).get('answer', '')}"})
    return script


def test_a_delegated_call_is_a_typed_journaled_nested_step_counted_in_every_budget() -> None:
    wf, supervisor, specialist = _pair(run_budget=RunBudget(max_model_calls=10))
    with WorkflowEnvironment() as env, env.override(specialist, script=[finish({"answer": "42"})]), \
            env.override(supervisor, script=_ask(specialist)):
        run = env.run(wf, {"question": "what is it?"})
        journal = env.client.journal(run.run_id)
        step = env.client.steps(run.run_id)[0]
        spend = env.client.spend(run.run_id)
    assert run.status.value == "succeeded" and run.output["lead"] == {"answer": "succeeded: 42"}
    nested = f"lead/{specialist}#1"
    types = [(e.step, e.type) for e in journal if e.step in ("lead", nested)]
    start = types.index((nested, "delegation_start"))
    assert types[start:start + 6] == [(nested, "delegation_start"), (nested, "agent_start"), (nested, "model_call"),
                                      (nested, "validation"), (nested, "outcome"), (nested, "delegation_result")]
    assert types[start - 1] == ("lead", "tool_call") and types[start + 6] == ("lead", "tool_result")
    result = next(e for e in journal if e.type == "delegation_result")
    assert result.data["tool_result"] == {"agent": specialist, "status": "succeeded", "output": {"answer": "42"}}
    call_event = next(e for e in journal if e.type == "tool_call")
    assert result.data["delegation_key"] == call_event.data["idempotency_key"]
    delegate_tokens = result.data["usage"]["totalTokens"]
    own_tokens = sum(e.data["usage"].get("totalTokens", 0) for e in journal if e.type == "model_call"
                     and e.step == "lead")
    assert step.tokens == own_tokens + delegate_tokens  # the caller's tokens include its delegate's
    assert step.tool_calls == 1 and step.spend_calls == 3 and spend["model_calls"] == 3  # 2 + 1 delegated


def test_needs_human_from_a_delegate_is_a_typed_result_the_caller_acts_on() -> None:
    wf, supervisor, specialist = _pair()
    escalate = _ask(specialist, then=lambda r: needs_human(f"the specialist asks: {r['question']}")
                    if r["status"] == "needs_human" else finish({"answer": "?"}))
    with WorkflowEnvironment() as env, env.override(specialist, script=[needs_human("which account?")]), \
            env.override(supervisor, script=escalate):
        run = env.run(wf, {"question": "refund?"})
        result = next(e for e in env.client.journal(run.run_id) if e.type == "delegation_result")
    assert result.data["status"] == "needs_human"
    assert result.data["tool_result"] == {"agent": specialist, "status": "needs_human", "question": "which account?"}
    assert run.status.value == "needs_human"
    assert "the specialist asks: which account?" in run.error["message"]


def test_a_delegate_over_its_own_budget_is_a_failed_result_and_the_caller_budget_counts_its_tokens() -> None:
    wf, supervisor, specialist = _pair(delegate_budget=Budget(max_model_calls=1))
    looping = [call("nothing_to_call"), finish({"answer": "never"})]
    with WorkflowEnvironment() as env, env.override(specialist, script=looping), \
            env.override(supervisor, script=_ask(specialist)):
        run = env.run(wf, {"question": "loop?"})
        result = next(e for e in env.client.journal(run.run_id) if e.type == "delegation_result")
    assert result.data["tool_result"]["status"] == "failed"
    assert result.data["tool_result"]["error_type"] in ("budget_exceeded", "tool_not_allowed")
    assert run.status.value == "succeeded" and run.output["lead"]["answer"].startswith("failed")

    tight, supervisor2, specialist2 = _pair(caller_budget=Budget(max_total_tokens=50))
    with WorkflowEnvironment() as env, env.override(specialist2, script=[finish({"answer": "x" * 400})]), \
            env.override(supervisor2, script=_ask(specialist2)):
        run = env.run(tight, {"question": "long?"})
    assert run.error["error_type"] == "budget_exceeded" and "50 tokens" in run.error["message"]


def test_the_runs_budget_counts_delegated_calls() -> None:
    wf, supervisor, specialist = _pair(run_budget=RunBudget(max_model_calls=2))
    with WorkflowEnvironment() as env, env.override(specialist, script=[finish({"answer": "42"})]), \
            env.override(supervisor, script=_ask(specialist)):
        run = env.run(wf, {"question": "how much?"})
    # the supervisor's first call and the delegate's: the supervisor's answer would be the third
    assert run.error["error_type"] == "run_budget_exceeded"
    assert run.error["message"].startswith("the run's budget of 2 model calls is spent")


def test_a_retryable_delegate_failure_retries_the_caller_and_reuses_finished_delegations() -> None:
    suffix = uuid.uuid4().hex[:6]
    first = register_agent(AgentSpec(name=f"first_{suffix}", input_model=Question, output_model=Answer,
                                     instructions="First opinion."))
    second = register_agent(AgentSpec(name=f"second_{suffix}", input_model=Question, output_model=Answer,
                                      instructions="Second opinion."))
    supervisor = AgentSpec(name=f"both_{suffix}", input_model=Question, output_model=Answer,
                           instructions="Ask both.", delegates=(first.name, second.name),
                           retry=RetryPolicy(max_attempts=2, backoff_base=0.01))
    wf = Workflow(f"both_flow_{suffix}", input_model=Question)
    wf.step("lead", supervisor)
    wf.register()

    def ask_both(ctx: ScriptContext) -> Turn:
        if len(ctx.tool_results) == 0:
            return call(f"ask_{first.name}", question="one")
        if len(ctx.tool_results) == 1:
            return call(f"ask_{second.name}", question="two")
        return finish({"answer": " + ".join(json.loads(r)["output"]["answer"] for r in ctx.tool_results)})

    with WorkflowEnvironment() as env, \
            env.override(first.name, script=lambda ctx: finish({"answer": "A"})) as first_model, \
            env.override(second.name, script=lambda ctx: throttle() if ctx.attempt == 1 else
                         finish({"answer": "B"})) as second_model, \
            env.override(supervisor.name, script=ask_both):
        run = env.run(wf, {"question": "both?"})
        journal = env.client.journal(run.run_id)
        report = env.client.replay(run.run_id)
    assert run.status.value == "succeeded" and run.output["lead"] == {"answer": "A + B"}
    retry = next(e for e in journal if e.type == "retry")
    assert retry.data["error_type"] == "model_throttled" and "delegated to" in retry.data["message"]
    reused = [e for e in journal if e.type == "delegation_reused"]
    assert [(e.attempt, e.data["agent"]) for e in reused] == [(2, first.name)]  # A finished: not asked again
    assert len(first_model.calls) == 1 and len(second_model.calls) == 2  # type: ignore[attr-defined]
    assert report.identical and report.live_model_calls == 0  # replay serves the delegations from the journal


def test_delegation_definitions_are_checked() -> None:
    suffix = uuid.uuid4().hex[:6]
    with pytest.raises(ConfigurationError, match="cannot delegate to itself"):
        AgentSpec(name=f"me_{suffix}", input_model=Question, output_model=Answer, instructions=".",
                  delegates=(f"me_{suffix}",))
    a = register_agent(AgentSpec(name=f"a_{suffix}", input_model=Question, output_model=Answer, instructions=".",
                                 delegates=(f"b_{suffix}",)))
    register_agent(AgentSpec(name=f"b_{suffix}", input_model=Question, output_model=Answer, instructions=".",
                             delegates=(a.name,)))
    cyclic = Workflow(f"cyc_{suffix}", input_model=Question)
    cyclic.step("s", a)
    with pytest.raises(WorkflowDefinitionError, match=f"delegation cycle: a_{suffix} -> b_{suffix} -> a_{suffix}"):
        cyclic.register()
    lonely = AgentSpec(name=f"l_{suffix}", input_model=Question, output_model=Answer, instructions=".",
                       delegates=("nobody_at_all",))
    unknown = Workflow(f"unk_{suffix}", input_model=Question)
    unknown.step("s", lonely)
    with pytest.raises(WorkflowDefinitionError, match="unknown agent 'nobody_at_all'"):
        unknown.register()


# ------------------------------------------------------------------------------------------ real workers
MODULES = "tests.delegation_flows"
LEASE = 1.5


@pytest.fixture()
def kill_env() -> Iterator[tuple[Client, dict[str, Any]]]:
    env = {"workflow_modules": MODULES, "lease_seconds": LEASE, "steps_queue": f"delegq-{uuid.uuid4().hex[:6]}"}
    client = Client(load_settings(workflow_modules=[MODULES], lease_seconds=LEASE, steps_queue=env["steps_queue"]))
    yield client, env


def _calls(client: Client, run_id: str, step: str) -> int:
    value = client.runtime.client.hget(model_calls_key(client.settings.key_prefix), f"{run_id}:{step}")
    return int(value or 0)


def _recover(client: Client, run_id: str, env: dict[str, Any], victim: Worker) -> Any:
    victim.kill()
    with Worker("deleg-survivor", concurrency=2, env=env):
        watchdog = Watchdog(client.runtime)

        def settled() -> Any:
            watchdog.scan()
            run = client.status(run_id)
            return run if run.status.value in ("succeeded", "failed", "escalated") else None

        return wait_until(settled, timeout=90, interval=0.2)


def test_a_worker_killed_in_the_middle_of_a_delegated_call_is_resumed_not_repeated(
        kill_env: tuple[Client, dict[str, Any]]) -> None:
    client, env = kill_env
    victim = Worker("deleg-victim", concurrency=2, env=env).start()
    try:
        run_id = client.submit("d_delegating", {"text": "slow-research on tides"})
        nested = "lead/d_researcher#1"
        # the researcher looked it up, its first call is journaled, and its second (30 s) call is in flight: kill now
        # (a model call is journaled with the tool call it asks for: wait for that write, not just for the next call)
        wait_until(lambda: _calls(client, run_id, nested) >= 2
                   and client.journal(run_id, step=nested, types=["model_call"]), timeout=30)
        run = _recover(client, run_id, env, victim)
    finally:
        victim.kill()
    assert run.status.value == "succeeded", run.error
    assert run.output["lead"]["report"] == "succeeded: slow-research on tides: facts about slow-research on tides"
    # the survivor re-sent neither the supervisor's first call nor the researcher's first: only the unfinished one
    assert _calls(client, run_id, "lead") == 1 + 1  # victim: ask; survivor: the report
    assert _calls(client, run_id, nested) == 2 + 1  # victim: lookup + the killed call; survivor: that call again
    starts = client.journal(run_id, step=nested, types=["delegation_start"])
    assert [s.attempt for s in starts] == [1, 2] and starts[-1].data["reused_responses"] == 1
    lookups = client.journal(run_id, step=nested, types=["tool_call"])
    assert len({e.data["idempotency_key"] for e in lookups}) == 1  # the same key both times
    assert len(client.journal(run_id, step="lead", types=["commit"])) == 1


def test_a_worker_killed_after_the_delegation_was_recorded_reuses_it_whole(
        kill_env: tuple[Client, dict[str, Any]]) -> None:
    client, env = kill_env
    victim = Worker("deleg-victim2", concurrency=2, env=env).start()
    try:
        run_id = client.submit("d_delegating", {"text": "slow-report on tides"})
        nested = "lead/d_researcher#1"
        # the delegation is recorded and the supervisor's (30 s) report call is in flight: kill now
        wait_until(lambda: client.journal(run_id, step=nested, types=["delegation_result"])
                   and _calls(client, run_id, "lead") >= 2, timeout=30)
        run = _recover(client, run_id, env, victim)
    finally:
        victim.kill()
    assert run.status.value == "succeeded", run.error
    assert _calls(client, run_id, nested) == 2  # the researcher ran once, on the victim
    reused = client.journal(run_id, step=nested, types=["delegation_reused"])
    assert [e.attempt for e in reused] == [2]
    assert _calls(client, run_id, "lead") == 2 + 1  # victim: ask + the killed report; survivor: the report only
    assert len(client.journal(run_id, step="lead", types=["commit"])) == 1


def test_runs_show_lists_delegated_calls_as_nested_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from teamster.orchestrator.cli import app  # noqa: PLC0415

    wf, supervisor, specialist = _pair()
    with WorkflowEnvironment() as env, env.override(specialist, script=[finish({"answer": "42"})]), \
            env.override(supervisor, script=_ask(specialist)):
        run = env.run(wf, {"question": "what is it?"})
        monkeypatch.setenv("TEAMSTER_REDIS_URL", str(env.settings.redis_url))
        monkeypatch.setenv("TEAMSTER_KEY_PREFIX", env.settings.key_prefix)
        shown = CliRunner().invoke(app, ["runs", "show", run.run_id], env={"COLUMNS": "100"})
        as_json = CliRunner().invoke(app, ["runs", "show", run.run_id, "--json"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    lead = next(i for i, line in enumerate(lines) if line.startswith("lead "))
    nested = lines[lead + 1].split()
    assert nested[:4] == [f"lead/{specialist}#1", "delegate", "succeeded", "1"]
    (item,) = json.loads(as_json.stdout)["steps"][0]["delegations"]
    assert item["agent"] == specialist and item["status"] == "succeeded" and item["live_model_calls"] == 1
