r"""Three CPU probes behind the Research-widths profile (benchmarks/README.md): small, standalone.

  python scripts/bench_probes.py                        # all three probes
  python scripts/bench_probes.py --probe=ragged --d_model=512 --rounds=41
  python scripts/bench_probes.py --probe=attention_core --rounds=21
  python scripts/bench_probes.py --probe=causal_blocks --seq_len=256 --rounds=21

ragged          Duo's `ragged_ffn` (compute 'sorted' without static per-row counts: router
                routes, evaluation draws, a decoding step) against the masked path (both FFNs
                on every row), one FFN layer's forward on m rows with i.i.d. routes at
                skip / small / big 0.2 / 0.3 / 0.5 (small FFN d_ff / 4), beside the MAC ideal.
attention_core  The causal core's score product, [b, h, t, t] from q, k [b, t, h, 64], in the
                formulations XLA could be given (the einsum the model uses, pre-transposed
                operands, a batched matmul, lax.map over the batch-heads), against one matmul
                of the same MACs: what the batched small products cost on this backend, and
                how many cores each keeps busy (user CPU time over wall time).
causal_blocks   dot_product_attention's causal query blocks (layers.attention.causal_blocks):
                the whole masked t x t square against query blocks of t/n rows that read only
                the keys up to their block, forward and forward + backward, with the fraction
                (n + 1) / 2n of the square each executes.

Every variant runs once per round, the order reversed every other round (ABBA), medians of
--rounds. Prints Markdown. A benchmark, never a test.
"""
import argparse
import statistics
import time


def _interleaved(fns, args, rounds):
  """{name: median seconds}, {name: median of per-round time over the first variant's} and
  {name: median of user CPU time over wall time}, how many cores a call keeps busy (getrusage
  counts every thread of the process)."""
  import resource  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  names = list(fns)
  for _ in range(2):
    for n in names:
      jax.block_until_ready(fns[n](*args[n]))
  times = {n: [] for n in names}
  busy = {n: [] for n in names}
  for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
      r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      jax.block_until_ready(fns[n](*args[n]))
      t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
      times[n].append(t1 - t0)
      busy[n].append((r1.ru_utime - r0.ru_utime) / (t1 - t0))
  first = times[names[0]]
  rel = {n: statistics.median(a / b for a, b in zip(times[n], first)) for n in names}
  return ({n: statistics.median(times[n]) for n in names}, rel,
          {n: statistics.median(busy[n]) for n in names})


def probe_ragged(d, rows, rounds):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from layers import duo  # pylint: disable=g-import-not-at-top
  f = 4 * d
  k = jax.random.split(jax.random.key(0), 6)
  big = {"wi": jax.random.normal(k[0], (d, f)) * d ** -0.5,
         "wo": jax.random.normal(k[1], (f, d)) * f ** -0.5}
  small = {"wi": jax.random.normal(k[2], (d, f // 4)) * d ** -0.5,
           "wo": jax.random.normal(k[3], (f // 4, d)) * f ** -0.5}
  masked = duo._two_ffns_masked  # pylint: disable=protected-access
  fns = {"masked": jax.jit(lambda x, r: masked(x, r, small, big, "gelu")),
         "ragged": jax.jit(lambda x, r: duo.ragged_ffn(x, r, small, big, "gelu"))}
  print(f"\nragged_ffn, one FFN layer's forward (d {d}, d_ff {f}, small {f // 4}), "
        f"median of {rounds} rounds:\n")
  print("| rows m | masked ms | ragged ms | ragged / masked | ideal (MACs) |")
  print("|---:|---:|---:|---:|---:|")
  for m in rows:
    x = jax.random.normal(k[4], (m, d))
    u = jax.random.uniform(k[5], (m,))
    routes = jnp.where(u < 0.2, duo.SKIP, jnp.where(u < 0.5, duo.SMALL, duo.BIG)).astype(jnp.int32)
    np.testing.assert_allclose(fns["ragged"](x, routes), fns["masked"](x, routes), atol=1e-4)
    secs, rel, _ = _interleaved(fns, {n: (x, routes) for n in fns}, rounds)
    ideal = float(jnp.mean(jnp.where(routes == duo.BIG, 1.0,
                                     jnp.where(routes == duo.SMALL, 0.25, 0.0)))) / 1.25
    print(f"| {m} | {1e3 * secs['masked']:.2f} | {1e3 * secs['ragged']:.2f} | "
          f"{rel['ragged']:.3f} | {ideal:.3f} |", flush=True)


def probe_attention_core(batch, seq_len, heads, rounds):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  hd, b, t, h = 64, batch, seq_len, heads
  q = jax.random.normal(jax.random.key(2), (b, t, h, hd))
  k = q * 0.5 + 1
  qh, kh = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
  q3, k3 = qh.reshape(b * h, t, hd), kh.reshape(b * h, t, hd)
  variants = {
      "one matmul [b h t, 64] x [64, t] (same MACs)": (
          lambda q, k: q.reshape(-1, hd) @ k[0].T, (q3, k3)),
      "einsum bqhd,bkhd->bhqk (the model's)": (
          lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k), (q, k)),
      "einsum bhqd,bhkd->bhqk (pre-transposed)": (
          lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k), (qh, kh)),
      "batched matmul [b h, t, 64] @ [b h, 64, t]": (
          lambda q, k: q @ k.transpose(0, 2, 1), (q3, k3)),
      "lax.map over the b h products": (
          lambda q, k: jax.lax.map(lambda a: a[0] @ a[1].T, (q, k)), (q3, k3)),
  }
  fns = {n: jax.jit(fn) for n, (fn, _) in variants.items()}
  secs, rel, threads = _interleaved(fns, {n: a for n, (_, a) in variants.items()}, rounds)
  macs = b * h * t * t * hd
  print(f"\nThe attention core's score product, batch {b} x {t} tokens, {h} heads of {hd} "
        f"({macs / 1e9:.3f} GMACs), median of {rounds} rounds:\n")
  print("| formulation | ms | x one matmul | GFLOP/s | threads |")
  print("|---|---:|---:|---:|---:|")
  for n in fns:
    print(f"| {n} | {1e3 * secs[n]:.2f} | {rel[n]:.2f} | {2 * macs / secs[n] / 1e9:.1f} | "
          f"{threads[n]:.2f} |")


def probe_causal_blocks(batch, seq_len, heads, rounds):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from layers.attention import causal_mask, dot_product_attention  # pylint: disable=g-import-not-at-top
  hd, b, t, h = 64, batch, seq_len, heads
  q, k, v = (jax.random.normal(jax.random.key(i), (b, t, h, hd)) for i in range(3))
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = causal_mask(pos, pos)
  counts = [n for n in (1, 2, 4, 8) if t % n == 0 and t // n >= 16]
  print(f"\nCausal query blocks, batch {b} x {t} tokens, {h} heads of {hd}, median of {rounds} "
        f"rounds (time relative to the whole square, n = 1):\n")
  print("| blocks n | rows per block | square executed | forward ms | x n = 1 | "
        "fwd + bwd ms | x n = 1 |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  fwd = {n: jax.jit(lambda q, k, v, n=n: dot_product_attention(q, k, v, mask, blocks=n))
         for n in counts}
  both = {n: jax.jit(jax.grad(lambda q, k, v, n=n: jnp.sum(
      dot_product_attention(q, k, v, mask, blocks=n) ** 2), argnums=(0, 1, 2)))
          for n in counts}
  for n in counts[1:]:
    np.testing.assert_allclose(fwd[n](q, k, v), fwd[1](q, k, v), atol=1e-5)
  f_secs, f_rel, _ = _interleaved(fwd, {n: (q, k, v) for n in counts}, rounds)
  b_secs, b_rel, _ = _interleaved(both, {n: (q, k, v) for n in counts}, rounds)
  for n in counts:
    print(f"| {n} | {t // n} | {(n + 1) / (2 * n):.3f} | {1e3 * f_secs[n]:.2f} | "
          f"{f_rel[n]:.3f} | {1e3 * b_secs[n]:.2f} | {b_rel[n]:.3f} |", flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--probe", default="ragged,attention_core,causal_blocks")
  p.add_argument("--d_model", type=int, default=512, help="ragged: the FFN's d_model")
  p.add_argument("--rows", default="32,256,1024,2048", help="ragged: row counts m")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--heads", type=int, default=16,
                 help="attention_core, causal_blocks: d_model 1024's 16")
  p.add_argument("--rounds", type=int, default=21)
  a = p.parse_args(argv)
  probes = [x.strip() for x in a.probe.split(",") if x.strip()]
  unknown = set(probes) - {"ragged", "attention_core", "causal_blocks"}
  if unknown:
    p.error(f"unknown --probe {sorted(unknown)}; choose from ragged, attention_core, "
            f"causal_blocks")
  import jax  # pylint: disable=g-import-not-at-top
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, float32")
  if "ragged" in probes:
    probe_ragged(a.d_model, [int(m) for m in a.rows.split(",")], a.rounds)
  if "attention_core" in probes:
    probe_attention_core(a.batch, a.seq_len, a.heads, a.rounds)
  if "causal_blocks" in probes:
    probe_causal_blocks(a.batch, a.seq_len, a.heads, a.rounds)


if __name__ == "__main__":
  main()
