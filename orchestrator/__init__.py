"""Workflows, the run store, the journal, the dead-letter queue, the watchdog, the client API and the CLI."""

__all__: list[str] = []
