"""Example agents and workflows (imported by workers through TEAMSTER_WORKFLOW_MODULES)."""

__all__: list[str] = []
