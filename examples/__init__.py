"""Example workflows (``teamster.examples``): loaded by ``teamster demo``, never by default."""

__all__: list[str] = []
