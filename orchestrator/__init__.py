"""Workflows, the run store, the journal, step execution, the dead-letter queue, the watchdog, the client API
and the CLI (internal package ``teamster.orchestrator``).

Import the public names from :mod:`teamster` (``from teamster import Workflow, submit, result``).
"""

__all__: list[str] = []
