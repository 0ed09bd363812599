"""Host memory for XLA's CPU runtime: freed buffers stay in the heap for the next call.

XLA's CPU client allocates each execution's temporary buffer (all of a jitted call's
intermediates: 67-80 MB for a d_model-1024 forward of `scripts/bench_research.py`) with
`posix_memalign` on one of its worker threads and frees it when the call ends. glibc serves a
worker thread from a thread arena, whose heaps hold at most 64 MiB, so a larger block is
`mmap`-ed and `munmap`-ed on every call whatever mmap threshold is set (`glibc.malloc.mmap_max=0`
does not reach it), and the kernel zero-fills every page of it again: 17.5k minor faults and
30-60 ms of sys time per d_model-1024 forward on the project's 2-core VM, a cost that does not
shrink when routing shrinks the arithmetic.

`keep_freed_memory()` puts every thread on glibc's main arena (a brk heap, with no size limit),
serves large blocks from it instead of mmap, and never trims it, so a call reuses the pages the
previous calls freed (0 minor faults per forward in the median). It must run before jax creates
its CPU client (a thread keeps the arena it first got); `adacomp.cli.run` calls it for every
entry point.

The cost is memory. The process keeps its peak heap until it exits, and the heap settles only
after some calls: XLA's `posix_memalign` splits small fragments off each block, glibc's tcache
holds them, and they keep the freed block from merging with its neighbours, so a block of the
same size does not fit back at first and the heap grows instead. A 113 MB temporary grew the
heap over 2-16 calls before every call reused it (tests/adacomp/test_hostmem.py); the resident
size ended at 956 MiB against 415 MiB with default malloc (526 MiB, settled after 2 calls, with
`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`, which only the environment can set). A
`scripts/bench_research.py` run at d_model 1024 peaked at 6.5 GiB against 5.4 GiB.

It applies on Linux with glibc when jax will run on the CPU: JAX_PLATFORMS unset or naming cpu
first, and no accelerator plugin installed. ADACOMP_HOST_MALLOC=default leaves malloc alone;
ADACOMP_HOST_MALLOC=keep applies it anyway.
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

from absl import logging

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_NEVER_TRIM = 2 ** 31 - 1  # mallopt takes an int: about 2 GiB of free heap before a trim

_applied = None


def _runs_on_cpu() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  try:
    plugins = importlib.metadata.entry_points(group="jax_plugins")
  except Exception:  # pylint: disable=broad-except
    plugins = ()
  return not list(plugins)


def _backend_started() -> bool:
  """Whether jax has already created a backend (its threads then hold their arenas)."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def keep_freed_memory() -> bool:
  """Applies the malloc settings above when they fit (see the module docstring); returns
  whether they are in effect. Idempotent."""
  global _applied
  if _applied is not None:
    return _applied
  mode = os.environ.get("ADACOMP_HOST_MALLOC", "auto").strip().lower()
  if mode not in ("auto", "keep", "default"):
    raise ValueError(f"ADACOMP_HOST_MALLOC={mode!r}: choose 'auto' (CPU runs keep freed "
                     f"memory), 'keep' (always) or 'default' (leave malloc alone).")
  _applied = False
  if mode == "default" or (mode == "auto" and not _runs_on_cpu()):
    return _applied
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return _applied
  if _backend_started():
    logging.warning("keep_freed_memory: jax's backend is already running, so its threads keep "
                    "their malloc arenas; call it before the first jax computation.")
    return _applied
  libc = ctypes.CDLL("libc.so.6")
  _applied = all(libc.mallopt(param, value) == 1 for param, value in (
      (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _NEVER_TRIM)))
  return _applied
