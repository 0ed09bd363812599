r"""Duo-LLM routed compute: time at several skip/small/big mixes against the FLOP-ratio ideal.

  python scripts/bench_duo.py                      # tiny model size, then a wider FFN
  python scripts/bench_duo.py --quick              # fewer repeats
  python scripts/bench_duo.py --json=/tmp/adacomp/bench_duo.json
  python scripts/bench_duo.py --train_only         # only the stage-1 training rows

For each mix (p_skip, p_small, p_big) it draws per-token, per-layer routes, and times, in one
process and interleaved round-robin (every variant once per round, --rounds rounds, medians), so
that load on the machine affects every variant alike:

  layer   one FFN layer on b*t tokens: DuoFFN(compute="gather") with capacities equal to the
          mix, against the dense FFN of the big width (all-big);
  model   the whole decoder forward pass (logits) with Duo gather FFNs in every layer, against
          the dense decoder of the same size.

  train   stage-1 training of one FFN layer (forward and backward, random routes at the mix
          (0.2, 0.3, 0.5) with mix_exact, a `routing` rng): compute "masked" (both FFNs) and
          "sorted" (XLA: static per-row slices), against the dense FFN; also XLA's compiled
          FLOPs over the dense layer's.

Columns: t/all-big is the measured time over the all-big time; ideal is the MAC ratio
(routed MACs / all-big MACs, from the layers' own sown `macs`, so attention and logits count in
the model rows). Routes are imposed, so the router is not part of the measurement.
"""
import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from adacomp.models.decoder import DecoderConfig, DecoderLM
from adacomp.scoring import macs_per_token
from layers.duo import BIG, SKIP, SMALL, DuoFFN
from layers.mlp import DenseFFN

MIXES = [(0.0, 0.0, 1.0), (0.0, 0.5, 0.5), (0.2, 0.3, 0.5), (0.0, 0.75, 0.25),
         (0.25, 0.5, 0.25), (0.5, 0.25, 0.25), (0.0, 1.0, 0.0), (0.5, 0.5, 0.0)]


def draw_routes(key, shape, mix):
  """Routes with exactly round(p * t) tokens per route in each sequence row, shuffled: the
  gather path's per-row capacities equal to the mix never bind."""
  *lead, t = shape
  counts = np.round(np.asarray(mix) * t).astype(int)
  counts[BIG] = t - counts[SKIP] - counts[SMALL]
  base = np.concatenate([np.full(c, r, np.int32) for r, c in
                         zip((SKIP, SMALL, BIG), counts)])
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
  rows = [rng.permutation(base) for _ in range(int(np.prod(lead)))]
  return jnp.asarray(np.stack(rows).reshape(shape))


def timed_round_robin(fns: dict, args: dict, rounds: int, warmup: int = 2) -> dict:
  """Median ms per call of each fn(*args[name]), interleaved across names."""
  for name, fn in fns.items():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args[name]))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(1000 * (time.perf_counter() - start))
  return {name: statistics.median(v) for name, v in times.items()}


def layer_rows(d_model, d_ff, batch, seq, rounds, key):
  x = jax.random.normal(key, (batch, seq, d_model), jnp.float32)
  dense = DenseFFN(d_ff=d_ff)
  dense_params = dense.init(key, x)
  fns = {"all-big": jax.jit(lambda p, x: dense.apply(p, x))}
  args = {"all-big": (dense_params, x)}
  macs = {"all-big": float(2 * d_model * d_ff)}
  for mix in MIXES:
    name = "/".join(f"{p:g}" for p in mix)
    duo = DuoFFN(d_ff=d_ff, compute="gather", capacity=(mix[SMALL], mix[BIG]))
    params = duo.init(key, x)
    # The big FFN shares the dense layer's weights (not needed for timing, but honest).
    routes = draw_routes(jax.random.fold_in(key, len(fns)), (batch, seq), mix)

    def run(p, x, r, duo=duo):
      y, inter = duo.apply(p, x, routes=r, mutable=["intermediates"])
      return y, inter["intermediates"]["macs"][0]

    fns[name], args[name] = jax.jit(run), (params, x, routes)
    macs[name] = float(jnp.mean(fns[name](*args[name])[1]))
  ms = timed_round_robin(fns, args, rounds)
  return [{"bench": "layer", "size": f"d={d_model} d_ff={d_ff} tokens={batch * seq}",
           "mix": name, "ms": ms[name], "t_rel": ms[name] / ms["all-big"],
           "ideal": macs[name] / macs["all-big"]} for name in fns]


def model_rows(cfg: DecoderConfig, batch, seq, rounds, key):
  ids = jax.random.randint(key, (batch, seq), 0, cfg.vocab_size)
  dense = DecoderLM(cfg)
  dense_params = dense.init(key, ids)

  def forward(model, p, ids, routes=None):
    logits, inter = model.apply(p, ids, routes=routes, mutable=["intermediates"])
    return logits, jnp.mean(macs_per_token(inter["intermediates"], ids.shape))

  fns = {"all-big": jax.jit(functools.partial(forward, dense))}
  args = {"all-big": (dense_params, ids)}
  for mix in MIXES:
    name = "/".join(f"{p:g}" for p in mix)
    ffn = functools.partial(DuoFFN, compute="gather", capacity=(mix[SMALL], mix[BIG]))
    model = DecoderLM(DecoderConfig(**{**cfg.__dict__, "ffn_cls": ffn}))
    params = model.init(key, ids)
    routes = draw_routes(jax.random.fold_in(key, len(fns)), (cfg.num_layers, batch, seq), mix)
    fns[name], args[name] = jax.jit(functools.partial(forward, model)), (params, ids, routes)
  macs = {name: float(fns[name](*args[name])[1]) for name in fns}
  ms = timed_round_robin(fns, args, rounds)
  size = (f"{cfg.num_layers} layers d={cfg.d_model} d_ff={cfg.d_ff} tokens={batch * seq}")
  return [{"bench": "model", "size": size, "mix": name, "ms": ms[name],
           "t_rel": ms[name] / ms["all-big"], "ideal": macs[name] / macs["all-big"]}
          for name in fns]


def _compiled_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def train_rows(d_model, d_ff, batch, seq, rounds, key, mix=(0.2, 0.3, 0.5)):
  x = jax.random.normal(key, (batch, seq, d_model), jnp.float32)
  rng = {"routing": jax.random.key(1)}

  def grad_of(module):
    return jax.grad(lambda p, x: jnp.sum(jnp.square(module.apply(p, x, rngs=rng))), (0, 1))

  dense = DenseFFN(d_ff=d_ff)
  variants = {"all-big (dense)": (dense, dense.init(key, x))}
  duo = DuoFFN(d_ff=d_ff, mix=mix, mix_exact=True)
  params = duo.init(key, x)
  for compute in ("masked", "sorted"):
    variants[f"{'/'.join(f'{p:g}' for p in mix)} {compute}"] = (
        duo.clone(compute=compute, impl="xla"), params)
  fns = {name: jax.jit(grad_of(m)) for name, (m, _) in variants.items()}
  args = {name: (p, x) for name, (_, p) in variants.items()}
  flops = {name: _compiled_flops(grad_of(m), p, x) for name, (m, p) in variants.items()}
  ms = timed_round_robin(fns, args, rounds)
  ideal = mix[BIG] + mix[SMALL] / 4
  base = "all-big (dense)"
  return [{"bench": "train", "size": f"d={d_model} d_ff={d_ff} tokens={batch * seq}",
           "mix": name, "ms": ms[name], "t_rel": ms[name] / ms[base],
           "ideal": 1.0 if name == base else (1 + 1 / 4 if name.endswith("masked") else ideal),
           "flops_rel": flops[name] / flops[base]} for name in fns]


def print_table(rows):
  print("| bench | size | mix skip/small/big | ms | t / all-big | ideal (MACs) | "
        "compiled FLOPs / all-big |")
  print("|---|---|---|---:|---:|---:|---:|")
  for r in rows:
    fl = f"{r['flops_rel']:.2f}" if "flops_rel" in r else "-"
    print(f"| {r['bench']} | {r['size']} | {r['mix']} | {r['ms']:.2f} | {r['t_rel']:.2f} | "
          f"{r['ideal']:.2f} | {fl} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer rounds")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--json", default=None)
  parser.add_argument("--train_only", action="store_true", help="only the stage-1 train rows")
  a = parser.parse_args(argv)
  rounds = 5 if a.quick else a.rounds
  key = jax.random.key(0)
  print(f"Duo routed inference on {jax.devices()[0].device_kind} ({jax.device_count()} device), "
        f"{rounds} interleaved rounds, medians", file=sys.stderr, flush=True)
  rows = []
  if not a.train_only:
    rows += layer_rows(128, 512, a.batch, a.seq, rounds, key)     # configs/sizes/tiny.gin
    rows += layer_rows(512, 2048, a.batch, a.seq, rounds, key)    # a wider FFN
    tiny = DecoderConfig(vocab_size=256, num_layers=4, d_model=128, num_heads=4, head_dim=32,
                         d_ff=512, max_len=a.seq)
    rows += model_rows(tiny, a.batch, a.seq, rounds, key)
  rows += train_rows(128, 512, a.batch, a.seq, rounds, key)
  rows += train_rows(512, 2048, a.batch, a.seq, rounds, key)
  print_table(rows)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
