"""``python -m teamster.orchestrator.cli``: the same as the ``teamster`` console script."""

from teamster.orchestrator.cli import main

__all__: list[str] = []

main()
