"""Gin registration of Duo-LLM's FFN layer (`layers.duo.DuoFFN`).

A flax linen class cannot be made gin-configurable directly: gin wraps `__init__` in a subclass,
which flax turns into a new dataclass module. So gin configures a factory that returns the class
with its Duo attributes bound, which `DecoderBlock` then calls like any FFN class:

    DecoderConfig.ffn_cls = @duo_ffn()
    duo_ffn.mode = 'router'
    duo_ffn.budget = (0.25, 0.5, 0.25)
"""
import functools
from typing import Optional, Sequence

import gin

from layers.duo import DuoFFN


def _tuple(values: Optional[Sequence[float]]):
  # Gin may hand over lists; module attributes should be hashable tuples.
  return None if values is None else tuple(values)


@gin.configurable
def duo_ffn(*, d_ff_small: Optional[int] = DuoFFN.d_ff_small, mode: str = DuoFFN.mode,
            compute: str = DuoFFN.compute, mix: Sequence[float] = DuoFFN.mix,
            seed: int = DuoFFN.seed, router_hidden: Optional[int] = DuoFFN.router_hidden,
            temperature: float = DuoFFN.temperature, budget: Sequence[float] = DuoFFN.budget,
            budget_weight: float = DuoFFN.budget_weight,
            train_router_only: bool = DuoFFN.train_router_only,
            capacity: Optional[Sequence[float]] = DuoFFN.capacity,
            mix_exact: bool = DuoFFN.mix_exact,
            impl: Optional[str] = DuoFFN.impl):
  """`DuoFFN` with these attributes bound (see layers/duo.py; the defaults are its own); the
  block supplies d_ff, activation and the dtypes."""
  return functools.partial(
      DuoFFN, d_ff_small=d_ff_small, mode=mode, compute=compute, mix=_tuple(mix), seed=seed,
      router_hidden=router_hidden, temperature=temperature, budget=_tuple(budget),
      budget_weight=budget_weight, train_router_only=train_router_only,
      capacity=_tuple(capacity), mix_exact=mix_exact, impl=impl)
