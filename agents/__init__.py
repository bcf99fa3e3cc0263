"""The agent contract: specs, outcomes, model providers, the scripted model, tool guards."""

__all__: list[str] = []
