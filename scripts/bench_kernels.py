r"""Routed-compute kernels against the XLA reference and the dense equivalent (a benchmark).

  python scripts/bench_kernels.py            # every op, several sizes
  python scripts/bench_kernels.py --quick    # one small size per op, few repeats
  python scripts/bench_kernels.py --ops=routed_ffn,pattention --repeats=50 --json=out.json

For each op and size it times three jitted functions: the dispatcher's choice (impl="auto": the
Pallas kernel on TPU/GPU, the XLA reference on CPU), the XLA reference (impl="xla") and the
dense equivalent (what the model would run without routing). Each is compiled and run --warmup
times, then timed --repeats times with jax.block_until_ready; the median is reported.

Columns
  ms         median wall time of one call
  GFLOP/s    useful FLOPs / time: the work the op needs (routed tokens only, real widths)
  use/exec   useful FLOPs / FLOPs the implementation executes (counted analytically; the
             references compute masked work, e.g. every FFN group on every token)
  t/dense    measured time / the dense equivalent's time
  ideal      useful FLOPs / dense FLOPs: the t/dense that perfect skipping would reach
"""
import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import _common
from pallas_kernels.pattention import gpu as pattention_gpu
from pallas_kernels.pattention import tpu as pattention_tpu


@dataclasses.dataclass
class Case:
  """One op at one size: the callables to time and their FLOP counts."""
  op: str
  size: str
  args: tuple
  fns: Dict[str, Callable]       # impl name -> function of args
  useful: float                  # FLOPs the op needs
  executed: Dict[str, float]     # impl name -> FLOPs it performs
  dense: float                   # FLOPs of the dense equivalent


def _platform() -> str:
  return jax.devices()[0].platform


def _auto_executed(reference_flops: float, kernel_flops: float) -> float:
  return reference_flops if _platform() == "cpu" else kernel_flops


def routed_ffn_case(m, d, f, mix, dtype, key) -> List[Case]:
  """Duo-style routes: skip / small FFN (width f/4) / big FFN (width f), rows sorted by route."""
  skip, small, big = mix
  k = jax.random.split(key, 5)
  x = jax.random.normal(k[0], (m, d), dtype)
  w_in, w_out, widths = pallas_kernels.stack_ffn_weights([
      (jax.random.normal(k[1], (d, f // 4), dtype) * d ** -0.5,
       jax.random.normal(k[2], (f // 4, d), dtype) * f ** -0.5),
      (jax.random.normal(k[3], (d, f), dtype) * d ** -0.5,
       jax.random.normal(k[4], (f, d), dtype) * f ** -0.5)])
  n_small, n_big = int(m * small), int(m * big)
  group_sizes = jnp.array([n_small, n_big], jnp.int32)

  def op(impl):
    return lambda x, w_in, w_out: pallas_kernels.routed_ffn(x, group_sizes, w_in, w_out, widths,
                                                            impl=impl)

  def dense(x, w_in, w_out):
    return jax.nn.gelu(x @ w_in[1]) @ w_out[1]

  useful = 4.0 * d * (n_small * f // 4 + n_big * f)
  reference = 4.0 * m * d * f * 2  # both groups on every row, at the padded width
  return [Case("routed_ffn", f"m={m} d={d} f={f} skip/small/big={skip}/{small}/{big}",
               (x, w_in, w_out), {"auto": op("auto"), "xla": op("xla"), "dense": dense},
               useful, {"auto": _auto_executed(reference, useful), "xla": reference,
                        "dense": 4.0 * m * d * f}, 4.0 * m * d * f)]


def gather_case(m, d, n, capacity, dtype, key) -> List[Case]:
  """Top-k execute-or-skip: a capacity of k rows of m through one matmul, then back."""
  k = jax.random.split(key, 3)
  x = jax.random.normal(k[0], (m, d), dtype)
  w = jax.random.normal(k[1], (d, n), dtype) * d ** -0.5
  base = jax.random.normal(k[2], (m, n), dtype)
  kk = int(m * capacity)
  idx = jax.random.permutation(key, m)[:kk].astype(jnp.int32)
  useful = 2.0 * kk * d * n
  dense = 2.0 * m * d * n
  executed = {"auto": useful, "xla": useful, "dense": dense}

  def gather(impl):
    return lambda x, w, base: pallas_kernels.gather_matmul(x, idx, w, impl=impl)

  def round_trip(impl):
    return lambda x, w, base: pallas_kernels.scatter(
        pallas_kernels.gather_matmul(x, idx, w, impl=impl), idx, base, impl=impl)

  size = f"m={m} d={d} n={n} capacity={capacity}"
  return [Case("gather_matmul", size, (x, w, base),
               {"auto": gather("auto"), "xla": gather("xla"), "dense": lambda x, w, base: x @ w},
               useful, executed, dense),
          Case("gather_matmul+scatter", size, (x, w, base),
               {"auto": round_trip("auto"), "xla": round_trip("xla"),
                "dense": lambda x, w, base: base + x @ w}, useful, executed, dense)]


def _pattention_recomputations(t, d, n, dtype) -> int:
  """How many extra times the platform's kernel computes X K_P^T: on TPU none when the score
  row fits the VMEM cache (else once more); on GPU once per attend output block."""
  if _platform() == "tpu":
    return 0 if pattention_tpu._blocks(t, n, d, d, dtype, 256, 512)[2] else 1
  return _common.cdiv(d, pattention_gpu._blocks(t, n, d, d, dtype, None, None, None, None)[3])


def pattention_case(t, d, n, dtype, key) -> List[Case]:
  """Dense equivalent: the same two matmuls with no normalisation (the floor of the fused op)."""
  k = jax.random.split(key, 3)
  x = jax.random.normal(k[0], (t, d), dtype)
  k_p = jax.random.normal(k[1], (n, d), dtype)
  v_p = jax.random.normal(k[2], (n, d), dtype) * n ** -0.5

  def op(impl):
    return lambda x, k_p, v_p: pallas_kernels.pattention(x, k_p, v_p, impl=impl)

  useful = 4.0 * t * n * d
  kernel = useful + 2.0 * t * n * d * _pattention_recomputations(t, d, n, dtype)
  return [Case("pattention", f"t={t} d_in=d_out={d} n={n}", (x, k_p, v_p),
               {"auto": op("auto"), "xla": op("xla"),
                "dense": lambda x, k_p, v_p: (x @ k_p.T) @ v_p},
               useful, {"auto": _auto_executed(useful, kernel), "xla": useful, "dense": useful},
               useful)]


SIZES = {
    "quick": {
        "routed_ffn": [(1024, 256, 1024, (0.5, 0.25, 0.25))],
        "gather_matmul": [(2048, 512, 512, 0.25)],
        "pattention": [(1024, 256, 1024)],
    },
    "full": {
        "routed_ffn": [(2048, 512, 2048, (0.5, 0.25, 0.25)), (2048, 512, 2048, (0.0, 0.0, 1.0)),
                       (4096, 512, 2048, (0.25, 0.5, 0.25))],
        "gather_matmul": [(4096, 1024, 1024, 0.125), (4096, 1024, 1024, 0.5)],
        "pattention": [(2048, 512, 512), (2048, 512, 2048)],
    },
}
# Each case is built by its own call so that its closures capture its own routing.
BUILDERS = {"routed_ffn": routed_ffn_case, "gather_matmul": gather_case,
            "pattention": pattention_case}


def median_ms(fn: Callable, args: Sequence, warmup: int, repeats: int) -> float:
  jitted = jax.jit(fn)
  for _ in range(warmup):
    jax.block_until_ready(jitted(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def run_case(case: Case, warmup: int, repeats: int) -> List[dict]:
  ms = {}
  for impl, fn in case.fns.items():
    print(f"  timing {case.op} [{case.size}] {impl} ...", file=sys.stderr, flush=True)
    ms[impl] = median_ms(fn, case.args, warmup, repeats)
  return [dict(op=case.op, size=case.size, impl=impl, ms=ms[impl],
               gflops=case.useful / (ms[impl] * 1e6),
               use_exec=case.useful / case.executed[impl],
               t_dense=ms[impl] / ms["dense"], ideal=case.useful / case.dense)
          for impl in case.fns]


def print_table(rows: List[dict]) -> None:
  header = f"{'size':<50} {'impl':<6} {'ms':>9} {'GFLOP/s':>8} {'use/exec':>8} " \
           f"{'t/dense':>8} {'ideal':>6}"
  for op in dict.fromkeys(r["op"] for r in rows):
    print(f"\n{op}\n{header}\n{'-' * len(header)}")
    for r in (r for r in rows if r["op"] == op):
      print(f"{r['size']:<50} {r['impl']:<6} {r['ms']:>9.3f} {r['gflops']:>8.1f} "
            f"{r['use_exec']:>8.2f} {r['t_dense']:>8.2f} {r['ideal']:>6.2f}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ops", default=",".join(BUILDERS), help="Comma-separated ops.")
  parser.add_argument("--quick", action="store_true", help="One small size per op.")
  parser.add_argument("--repeats", type=int, default=None, help="Timed runs (median).")
  parser.add_argument("--warmup", type=int, default=2, help="Untimed runs after compiling.")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="Default: float32 on CPU, bfloat16 on accelerators.")
  parser.add_argument("--json", default=None, help="Also write the rows as JSON here.")
  args = parser.parse_args(argv)
  repeats = args.repeats or (5 if args.quick else 20)
  dtype = jnp.dtype(args.dtype or ("float32" if _platform() == "cpu" else "bfloat16"))
  sizes = SIZES["quick" if args.quick else "full"]
  ops = [op for op in args.ops.split(",") if op]
  unknown = set(ops) - set(BUILDERS)
  if unknown:
    parser.error(f"unknown ops {sorted(unknown)}; choose from {sorted(BUILDERS)}")

  device = jax.devices()[0]
  print(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}, {dtype.name}, "
        f"median of {repeats} after {args.warmup} warm-up runs; auto resolves to "
        f"{'the XLA reference' if device.platform == 'cpu' else 'the Pallas kernel'}")
  rows = []
  key = jax.random.key(0)
  for op in ops:
    for size in sizes[op]:
      for case in BUILDERS[op](*size, dtype, key):
        rows.extend(run_case(case, args.warmup, repeats))
  print_table(rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=device.device_kind, platform=device.platform,
                     jax=jax.__version__, dtype=dtype.name, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
