"""Checks of counts, intervals and rates given through gin, before a run writes anything.

Each check names the binding (`train.num_steps`), what it got and what it expects, so a wrong
value ends in one ERROR line instead of a ZeroDivisionError or StopIteration much later.
"""
import math
from typing import Optional


class BindingTypeError(ValueError):
  """A gin binding of the wrong type (a ValueError, so entry points print one ERROR line)."""


def check_int(name: str, value, minimum: Optional[int] = None, why: str = "") -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise BindingTypeError(f"{name}={value!r}: expected an int, got {type(value).__name__}. "
                           f"Bind it without quotes, e.g. {name} = 100.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name}={value}: must be >= {minimum}{why}.")


def check_optional_int(name: str, value, minimum: int, none_means: str) -> None:
  if value is not None:
    check_int(name, value, minimum, f" (or None for {none_means})")


def check_rate(name: str, value, allow_zero: bool = False, why: str = "") -> None:
  """A finite float > 0 (>= 0 with `allow_zero`); `why` is added to the range error."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise BindingTypeError(f"{name}={value!r}: expected a float, got {type(value).__name__}. "
                           f"Bind it without quotes, e.g. {name} = 3e-3.")
  if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f"{name}={value}: must be a finite number {'>=' if allow_zero else '>'} 0, "
                     f"e.g. 3e-3.{why}")
