"""Workflows, the run store, the journal, the dead-letter queue, the watchdog, the client API and the CLI.

Application API::

    from orchestrator import Workflow, submit, status, result, cancel
    from orchestrator import human_review, retry_with, fail_run
"""

from orchestrator.client import Client, cancel, default_client, result, status, submit
from orchestrator.escalation import fail_run, human_review, retry_with
from orchestrator.models import DeadLetterEntry, RunRecord, RunStatus, StepRecord, StepStatus
from orchestrator.workflow import Workflow, get_workflow, register_workflow

__all__ = [
    "Workflow",
    "get_workflow",
    "register_workflow",
    "Client",
    "default_client",
    "submit",
    "status",
    "result",
    "cancel",
    "retry_with",
    "human_review",
    "fail_run",
    "RunRecord",
    "RunStatus",
    "StepRecord",
    "StepStatus",
    "DeadLetterEntry",
]
