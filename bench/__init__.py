"""teamster benchmarks: raw Celery vs teamster on the same machine, in the same run (see bench/README.md)."""

from __future__ import annotations

__all__: list[str] = []
