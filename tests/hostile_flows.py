"""Workflows of the hostile-input tests (imported by their worker too).

* ``h_crash``: an agent whose model raises an exception no classifier knows (a provider library's own bug);
* ``h_prompt``: an agent whose input cannot be serialised into a prompt (its model's serializer raises);
* ``h_surrogate``: an agent whose model answers with a lone surrogate in its structured output;
* ``h_slow``: one scripted step that takes ``[slow=<s>]`` seconds (a step in flight while poison arrives).
"""

from __future__ import annotations

from pydantic import BaseModel, field_serializer

from teamster import AgentSpec, Workflow
from teamster.testing import ScriptContext, Turn, finish, register_script

__all__ = ["Text", "Word"]


class Text(BaseModel):
    text: str


class Word(BaseModel):
    word: str


class Fragile(BaseModel):
    text: str

    @field_serializer("text")
    def _explode(self, value: str) -> str:
        raise ValueError("this input cannot be written into a prompt")


class ProviderBug(RuntimeError):
    """What a provider SDK raises when it has a bug: nothing teamster knows how to classify."""


def _crash(ctx: ScriptContext) -> Turn:
    text = str(ctx.input_json().get("text", ""))  # echoed, as SDK errors often echo the request
    raise ProviderBug(f"'NoneType' object has no attribute 'choices' (inside the provider SDK, request {text!r})")


def _slow(ctx: ScriptContext) -> Turn:
    text = str(ctx.input_json().get("text", ""))
    seconds = float(text.split("[slow=")[1].split("]")[0]) if "[slow=" in text else 0.0
    return finish({"word": "done"}).after(seconds)


register_script("h_crash", _crash)
register_script("h_prompt", [finish({"word": "never"})])
register_script("h_surrogate", [finish({"word": "bro\ud800ken"})])
register_script("h_slow", _slow)

for name, model in (("h_crash", Text), ("h_prompt", Fragile), ("h_surrogate", Text), ("h_slow", Text)):
    agent = AgentSpec(name=name, input_model=model, output_model=Word, instructions="One word.", model="scripted")
    flow = Workflow(name, input_model=Text)  # the run input is plain text; h_prompt's agent input is not
    flow.step("work", agent)
    flow.register()
