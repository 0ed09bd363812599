"""adacomp.hostmem: with it, a jitted call whose temporaries exceed glibc's 64 MiB thread-arena
heaps reuses the previous calls' pages instead of faulting in fresh ones, once the heap has
settled (glibc's memalign fragments make the first few calls grow it: see the module)."""
import json
import os
import platform
import subprocess
import sys

import pytest

from adacomp import hostmem

# Temporaries of about 113 MB (two cumulative sums of a 36 MB array: memory_analysis reads
# them), minor page faults per call counted with getrusage, in 4 KiB pages whatever the host's
# huge-page settings.
PROBE = r"""
import ctypes, json, resource, sys
# Transparent huge pages off for this process (PR_SET_THP_DISABLE): a host whose THP is
# 'always' would otherwise fault the default run's fresh blocks in 2 MiB pages, not 4 KiB ones.
ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)
from adacomp import hostmem
kept = hostmem.keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x), axis=0)[-1].sum()
            + jnp.cumsum(jnp.cos(x), axis=1)[:, -1].sum())
x = jnp.ones((3072, 3072))
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(int(sys.argv[1])):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"kept": kept, "temp": temp, "faults": faults}))
"""


CALLS, SETTLED = 32, 12  # calls made; the last SETTLED are read (the heap settles in 2-16)


def _probe(mode):
  env = dict(os.environ, ADACOMP_HOST_MALLOC=mode, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.pop("GLIBC_TUNABLES", None)  # e.g. the benchmarks' glibc.malloc.hugetlb=1
  out = subprocess.run([sys.executable, "-c", PROBE, str(CALLS)], env=env, capture_output=True,
                       text=True, check=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_freed_temporaries_are_reused():
  default, kept = _probe("default"), _probe("keep")
  assert not default["kept"] and kept["kept"]
  pages = default["temp"] / 4096
  assert pages > 64 * 2 ** 20 / 4096  # over a thread arena's heap: mmap-ed each call
  # glibc maps the temporaries afresh on every call: each of their pages faults again.
  assert all(f > 0.9 * pages for f in default["faults"][-SETTLED:]), default["faults"]
  # Kept in the heap: once it has settled, a call finds its pages already there (a late
  # regrowth of the heap now and then faults one call's worth again).
  assert sum(f > 0.05 * pages for f in kept["faults"][-SETTLED:]) <= 2, kept["faults"]


def test_bad_mode_names_the_choices(monkeypatch):
  monkeypatch.setattr(hostmem, "_applied", None)
  monkeypatch.setenv("ADACOMP_HOST_MALLOC", "always")
  with pytest.raises(ValueError, match="'auto'.*'keep'.*'default'"):
    hostmem.keep_freed_memory()


def test_default_mode_and_accelerators_leave_malloc_alone(monkeypatch):
  monkeypatch.setattr(hostmem, "_applied", None)
  monkeypatch.setenv("ADACOMP_HOST_MALLOC", "default")
  assert hostmem.keep_freed_memory() is False
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not hostmem._runs_on_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert hostmem._runs_on_cpu()
