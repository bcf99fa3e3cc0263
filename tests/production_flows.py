"""Workflows of the production-path tests (imported by their worker processes too).

* ``prod_http``: one agent on the worker's model -- in the tests strands' real ``OpenAIModel`` + the ``openai`` SDK
  over HTTP to the local model server of ``bench/model_server.py`` (``TEAMSTER_MODEL_BASE_URL``).
* ``prod_hang``: the same agent with a 2 s budget and 2 attempts; an input containing ``[hang]`` makes the server
  never answer.
* ``prod_blocking``: a scripted agent that calls a tool which blocks far past the step's 2 s budget.
* ``prod_pair``: two scripted steps (the small-pool test).
"""

from __future__ import annotations

import threading

from pydantic import BaseModel

from teamster import AgentSpec, Budget, RetryPolicy, Workflow, tool
from teamster.testing import call, finish, register_script

__all__ = ["Question", "Answer", "RELEASE", "BUDGET_SECONDS"]

BUDGET_SECONDS = 2.0
RELEASE = threading.Event()
"""Set it to let the blocking tool return (it never is in the tests: the tool outlives its step)."""


class Question(BaseModel):
    text: str


class Answer(BaseModel):
    answer: str


@tool
def wait_for_warehouse(order_id: str) -> str:
    """Ask the warehouse about an order (this one blocks for ten minutes)."""
    RELEASE.wait(600)
    return f"order {order_id}: late answer"


_retry = RetryPolicy(max_attempts=2, backoff_base=0.1, backoff_max=0.2)
# No provider named here: the worker's TEAMSTER_MODEL decides (so a test process importing this module does not
# register agents that need credentials it does not have).
http_agent = AgentSpec(name="prod_http", input_model=Question, output_model=Answer, instructions="Answer briefly.",
                       retry=_retry)
hang_agent = AgentSpec(name="prod_hang", input_model=Question, output_model=Answer, instructions="Answer briefly.",
                       budget=Budget(timeout_seconds=BUDGET_SECONDS), retry=_retry)
blocking_agent = AgentSpec(name="prod_blocking", input_model=Question, output_model=Answer,
                           instructions="Ask the warehouse.", tools=("wait_for_warehouse",),
                           budget=Budget(timeout_seconds=BUDGET_SECONDS), retry=RetryPolicy(max_attempts=1),
                           model="scripted")
register_script("prod_blocking", [call("wait_for_warehouse", order_id="A1"), finish({"answer": "never"})])
pair_agent = AgentSpec(name="prod_pair", input_model=Question, output_model=Answer, instructions="Answer.",
                       model="scripted")

for name, agent in (("prod_http", http_agent), ("prod_hang", hang_agent), ("prod_blocking", blocking_agent)):
    flow = Workflow(name, input_model=Question)
    flow.step("ask", agent)
    flow.register()

pair = Workflow("prod_pair", input_model=Question)
pair.step("first", pair_agent, writes="first")
pair.step("second", pair_agent, after="first", writes="second")
pair.register()
