"""``python -m orchestrator.cli``: the same as the ``teamster`` console script."""

from orchestrator.cli import main

__all__: list[str] = []

main()
