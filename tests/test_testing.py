"""teamster.testing: what users rely on to test their own workflows in-process."""

from __future__ import annotations

import uuid

import pytest
from pydantic import BaseModel

from teamster import AgentSpec, Workflow
from teamster.errors import ModelRequestBlocked, RunFailed
from teamster.orchestrator.models import Delivery
from teamster.testing import WorkflowEnvironment, finish, throttle

pytestmark = pytest.mark.integration


class Text(BaseModel):
    text: str


class Word(BaseModel):
    word: str


def _workflow(model: str | None = None) -> tuple[str, str]:
    """A one-step workflow with a fresh name; its agent runs on ``model`` (None: the configured one)."""
    suffix = uuid.uuid4().hex[:6]
    agent = AgentSpec(name=f"tt_agent_{suffix}", input_model=Text, output_model=Word, instructions="One word.",
                      model=model)
    wf = Workflow(f"tt_flow_{suffix}", input_model=Text)
    wf.step("pick", agent)
    wf.register()
    return wf.name, agent.name


def test_a_real_model_request_fails_the_test_loudly() -> None:
    name, _agent = _workflow(model="openai:gpt-4o-mini")
    with WorkflowEnvironment() as env:
        run_id = env.submit(name, {"text": "hi"})
        with pytest.raises(ModelRequestBlocked, match="openai:gpt-4o-mini"):
            env.drain()
        step = env.client.steps(run_id)[0]
        assert step.outcome and step.outcome["error_type"] == "model_request_blocked"


def test_an_override_replaces_the_model_and_retries_are_drained_at_once() -> None:
    name, agent = _workflow(model="openai:gpt-4o-mini")
    with WorkflowEnvironment() as env:
        with env.override(agent, script=lambda ctx: throttle() if ctx.attempt == 1 else finish({"word": "ok"})) \
                as model:
            run = env.run(name, {"text": "hi"})
        assert run.status == "succeeded" and run.output["pick"] == {"word": "ok"}
        assert [d.status for d in env.deliveries] == [Delivery.RETRY, Delivery.COMMITTED]
        assert len(model.calls) == 2  # type: ignore[attr-defined]
        assert env.result(run.run_id).model_dump()["pick"] == {"word": "ok"}


def test_environments_are_isolated_and_clean_up_after_themselves() -> None:
    name, agent = _workflow()
    with WorkflowEnvironment() as first, WorkflowEnvironment() as second:
        with first.override(agent, script=[finish({"word": "one"})]):
            run = first.run(name, {"text": "a"})
        assert first.settings.key_prefix != second.settings.key_prefix
        assert [r.run_id for r in first.client.runs()] == [run.run_id]
        assert second.client.runs() == []
        client, prefix = first.runtime.client, first.settings.key_prefix
    assert not list(client.scan_iter(match=f"{prefix}:*"))


def test_result_raises_the_typed_failure_of_the_run() -> None:
    from teamster.testing import cannot_complete

    name, agent = _workflow()
    with WorkflowEnvironment() as env, env.override(agent, script=[cannot_complete("no idea")]):
        run_id = env.submit(name, {"text": "?"})
        with pytest.raises(RunFailed) as info:
            env.result(run_id)
        assert info.value.status == "escalated" and info.value.reason["error_type"] == "cannot_complete"


def test_settings_overrides_apply() -> None:
    name, _agent = _workflow()
    from teamster.errors import PayloadRejected

    with WorkflowEnvironment(max_payload_bytes=300) as env, pytest.raises(PayloadRejected):
        env.submit(name, {"text": "x" * 400})
