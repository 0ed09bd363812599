"""Which implementation an op runs: the `impl` argument and the process-wide default.

impl      what runs
--------  ------------------------------------------------------------------------------------
"auto"    `lax.platform_dependent`: the XLA reference on CPU, the Mosaic TPU kernel on TPU, the
          Triton kernel on CUDA (the reference on any other platform). The choice is made when
          the function is lowered, so one jitted function serves every backend and exports.
"xla"     the reference (plain jnp), on every platform.
"pallas"  the Pallas kernel of the platform, without a reference fallback: lowering for CPU
          fails (NotImplementedError: no translation rule for 'platform_index' on cpu).
"interpret"      the TPU kernel under Mosaic's TPU interpreter (runs on CPU; for tests).
"interpret_gpu"  the Triton kernel under the HLO interpreter (runs on CPU; for tests).
None      the process-wide default: `set_default_impl`, or `default_impl(...)` as a context
          manager; "auto" unless changed.

The choice is resolved when an op is traced: set the default before jitting (a function jax has
already traced keeps the implementation it traced with).
"""
import contextlib
import threading
from typing import Callable, Iterator, Optional

import jax

IMPLS = ("auto", "xla", "pallas", "interpret", "interpret_gpu")

_state = threading.local()
_process_default = ["auto"]  # a list so that set_default_impl rebinds nothing


def _check(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"Unknown kernel impl {impl!r}; choose one of {IMPLS}.")
  return impl


def set_default_impl(impl: str) -> None:
  """Sets the implementation that ops called with `impl=None` run (process-wide)."""
  _process_default[0] = _check(impl)


def get_default_impl() -> str:
  """The implementation `impl=None` resolves to here (a `default_impl` context wins)."""
  return getattr(_state, "override", None) or _process_default[0]


@contextlib.contextmanager
def default_impl(impl: str) -> Iterator[None]:
  """Within the block (this thread), `impl=None` means `impl`."""
  previous = getattr(_state, "override", None)
  _state.override = _check(impl)
  try:
    yield
  finally:
    _state.override = previous


def resolve(impl: Optional[str]) -> str:
  return get_default_impl() if impl is None else _check(impl)


def dispatch(impl: Optional[str], *args, reference: Callable, tpu: Callable, gpu: Callable):
  """Runs one of three implementations of the same op on `args` (arrays or pytrees).

  `tpu` and `gpu` take `interpret` as a keyword; `reference` takes the args only.
  """
  impl = resolve(impl)
  if impl == "xla":
    return reference(*args)
  if impl == "interpret":
    return tpu(*args, interpret=True)
  if impl == "interpret_gpu":
    return gpu(*args, interpret=True)
  tpu_kernel = lambda *a: tpu(*a, interpret=False)
  gpu_kernel = lambda *a: gpu(*a, interpret=False)
  if impl == "pallas":
    return jax.lax.platform_dependent(*args, tpu=tpu_kernel, cuda=gpu_kernel)
  return jax.lax.platform_dependent(*args, cpu=reference, tpu=tpu_kernel, cuda=gpu_kernel,
                                    default=reference)
