"""Workflows of the provider-limit tests (imported by their worker processes too).

* ``lim_http``: one agent on the worker's model (strands' ``OpenAIModel`` over HTTP to the local model server), the
  limits those workers share come from ``TEAMSTER_PROVIDER_LIMITS``.
* ``lim_slot``: an agent on ``openai:slot``, whose limit is one concurrent call; an input with ``[hang]`` holds the
  slot until the worker dies.
"""

from __future__ import annotations

from pydantic import BaseModel

from teamster import AgentSpec, RetryPolicy, Workflow

__all__ = ["Question", "Answer"]


class Question(BaseModel):
    text: str


class Answer(BaseModel):
    answer: str


http_agent = AgentSpec(name="lim_http", input_model=Question, output_model=Answer, instructions="Answer briefly.",
                       retry=RetryPolicy(max_attempts=6, backoff_base=0.2, backoff_max=2.0))
slot_agent = AgentSpec(name="lim_slot", input_model=Question, output_model=Answer, instructions="Answer briefly.",
                       model="openai:slot", retry=RetryPolicy(max_attempts=1))

for flow_name, agent in (("lim_http", http_agent), ("lim_slot", slot_agent)):
    flow = Workflow(flow_name, input_model=Question)
    flow.step("ask", agent)
    flow.register()
