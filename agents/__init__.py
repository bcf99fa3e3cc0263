"""The agent contract (internal package ``teamster.agents``): specs, outcomes, the guarded strands runner, model
providers, the offline scripted model, tool guards and error classification.

Import the public names from :mod:`teamster` (``from teamster import AgentSpec, run_agent``); the modules here
stay importable for advanced use, but only :mod:`teamster` and :mod:`teamster.testing` are the API.
"""

__all__: list[str] = []
