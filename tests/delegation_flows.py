"""Workflows of the delegation tests (imported by their worker processes too).

``d_supervisor`` delegates to ``d_researcher`` (``ask_d_researcher``) and then writes a report. Scripts steer by the
input text: ``slow-research`` makes the researcher's second model call take 30 s on the first attempt (a worker can
be killed in the middle of the delegated call), ``slow-report`` makes the supervisor's final call take 30 s on the
first attempt (killed after the delegation was recorded). Every scripted model call is counted in Redis per
``run:step`` (nested steps included).
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from teamster import AgentSpec, Budget, RetryPolicy, Workflow, register_agent, tool
from teamster.testing import ScriptContext, Turn, call, finish, record_model_calls, register_script

__all__ = ["Task", "Finding", "Report"]

SLOW = 30.0

record_model_calls()


class Task(BaseModel):
    text: str


class Finding(BaseModel):
    finding: str


class Report(BaseModel):
    report: str


@tool
def d_lookup(query: str) -> str:
    """Look something up (deterministic)."""
    return f"facts about {query}"


def _research(ctx: ScriptContext) -> Turn:
    text = str(ctx.input_json().get("text", ""))
    if ctx.call_index == 0:
        return call("d_lookup", query=text)
    answer = finish({"finding": f"{text}: {ctx.tool_results[-1] if ctx.tool_results else '?'}"})
    return answer.after(SLOW) if "slow-research" in text and ctx.attempt == 1 else answer


def _supervise(ctx: ScriptContext) -> Turn:
    text = str(ctx.input_json().get("text", ""))
    if ctx.call_index == 0:
        return call("ask_d_researcher", text=text)
    found = json.loads(ctx.tool_results[-1]) if ctx.tool_results else {}
    report = finish({"report": f"{found.get('status')}: {found.get('output', {}).get('finding', '')}"})
    return report.after(SLOW) if "slow-report" in text and ctx.attempt == 1 else report


register_script("d_researcher", _research)
register_script("d_supervisor", _supervise)

researcher = register_agent(AgentSpec(name="d_researcher", input_model=Task, output_model=Finding,
                                      instructions="Research it.", tools=("d_lookup",), model="scripted"))
supervisor = AgentSpec(name="d_supervisor", input_model=Task, output_model=Report,
                       instructions="Ask the researcher, then report.", delegates=("d_researcher",),
                       budget=Budget(timeout_seconds=120), retry=RetryPolicy(max_attempts=2), model="scripted")

flow = Workflow("d_delegating", input_model=Task)
flow.step("lead", supervisor)
flow.register()
