"""What a run input must be before anything is written: JSON the store and the model can carry.

:func:`check_payload` walks a value without recursion (a value nested 10,000 deep is refused, not a
``RecursionError``) and refuses, with :class:`~teamster.errors.InvalidInput` naming the field:

* strings (values or keys) that cannot be encoded as UTF-8 -- lone surrogates such as ``"\\ud800"``, typically from
  a badly decoded upstream payload; the model provider's request and the journal could not carry them;
* nesting deeper than ``max_depth`` (``TEAMSTER_MAX_INPUT_DEPTH``, 64 by default);
* values JSON cannot represent: ``NaN`` and infinities, bytes, sets, arbitrary objects, non-string keys.

Pydantic models are checked as their JSON dump (``model_dump(mode="json")``).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from teamster.errors import InvalidInput

__all__ = ["check_payload", "field_path"]

_SCALARS = (bool, int, type(None))


def field_path(path: tuple[str | int, ...]) -> str:
    """``("items", 3, "name")`` -> ``items[3].name`` (``(root)`` for the empty path)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:  # a key may itself be the problem: show it escaped, never as an unencodable string
            name = part.encode("utf-8", "backslashreplace").decode("utf-8")
            out += f".{name}" if out else name
    return out or "(root)"


def _refuse(path: tuple[str | int, ...], problem: str, what: str) -> InvalidInput:
    where = field_path(path)
    return InvalidInput(f"{what} field {where}: {problem}", field=where,
                        hint="Fix that field; nothing was written.")


def _check_text(text: str, path: tuple[str | int, ...], what: str, role: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start:exc.end].encode("utf-8", "backslashreplace").decode("ascii")
        raise _refuse(path, f"{role} contains {bad} at position {exc.start}, which cannot be encoded as UTF-8 "
                            "(a lone surrogate: decode the upstream bytes correctly)", what) from None


def check_payload(value: Any, *, max_depth: int = 64, what: str = "input") -> Any:
    """Check that ``value`` is JSON the store and the model can carry; returns it as plain JSON data.

    Raises:
        InvalidInput: naming the first field at fault (see the module docstring).
    """
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > max_depth:
            raise _refuse(path[:max_depth], f"nested more than {max_depth} levels deep "
                                            "(TEAMSTER_MAX_INPUT_DEPTH)", what)
        if isinstance(item, str):
            _check_text(item, path, what, "the text")
        elif isinstance(item, _SCALARS):
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise _refuse(path, f"{item} is not a JSON number", what)
        elif isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise _refuse(path, f"has a key of type {type(key).__name__} ({key!r}); JSON keys are strings",
                                  what)
                _check_text(key, (*path, key), what, "the key")
                stack.append((sub, (*path, key)))
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, (*path, i)) for i, sub in enumerate(item))
        elif isinstance(item, BaseModel):
            stack.append((item.model_dump(mode="json"), path))
        else:
            raise _refuse(path, f"a {type(item).__name__} is not JSON (use strings, numbers, booleans, null, "
                                "lists and objects)", what)
    return value
