"""Example workflows (``teamster.examples``): loaded by ``teamster demo --example NAME``, never by default.

* ``triage`` (:mod:`teamster.examples.triage`) -- support-ticket triage: four agents in a pipeline with a lookup
  tool, routing, a retry after throttling, an escalation and a human review.
* ``research`` (:mod:`teamster.examples.research`) -- a research brief: a supervisor agent delegating to
  specialists, then a child workflow that drafts and reviews the brief.

:data:`EXAMPLES` describes them for the demo; importing this package imports neither example.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Example", "EXAMPLES"]


@dataclass(frozen=True)
class Example:
    """One example the demo can run.

    Attributes:
        name: What ``--example`` takes.
        module: The module that registers its workflows (imported by the demo and its worker).
        workflow: The workflow the demo submits.
        samples: The attribute of ``module`` holding the sample inputs.
        label_field: The input field that names a sample in the demo's tables.
        item: What one sample is called ("ticket", "topic").
        verb: What the demo says it is doing with them ("triaging").
        summary: One line: what it shows.
        approve: For a run waiting for a person: an output that resolves it (printed as a command that runs as
            pasted), or None.
        follow: Follow the first run's progress live (``Client.events``) before the batch's progress bar.
    """

    name: str
    module: str
    workflow: str
    samples: str
    label_field: str
    item: str
    verb: str
    summary: str
    approve: str | None = None
    follow: bool = False


EXAMPLES: dict[str, Example] = {
    "triage": Example(
        name="triage", module="teamster.examples.triage", workflow="ticket_triage", samples="SAMPLE_TICKETS",
        label_field="ticket_id", item="ticket", verb="triaging",
        summary="support-ticket triage: four agents, a lookup tool, a retry, an escalation, a human review",
        approve='{"approved": true, "issues": []}'),
    "research": Example(
        name="research", module="teamster.examples.research", workflow="research_brief", samples="SAMPLE_TOPICS",
        label_field="topic", item="topic", verb="researching",
        summary="a research brief: a supervisor delegating to specialists, then a child workflow drafting it",
        approve='{"findings": ["published as unconfirmed"], "sources": []}', follow=True),
}
