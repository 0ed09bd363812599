r"""Informed routing vs greedy skip: inference time against the FLOP-ratio ideal (a benchmark).

  python scripts/bench_routing.py                      # tiny model, batch 16 x 128 tokens
  python scripts/bench_routing.py --units=ffn,attention --repeats=30
  python scripts/bench_routing.py --train_steps        # also: training step time per stage

Inference: one forward pass of the decoder over a batch (teacher-forced, as evaluation runs),
for the dense model and for routed FFNs (and/or attention, --units) in "gather" compute at
each sparsity (the fraction of tokens that do NOT execute a unit), informed (the forecaster
stands in) and greedy (skip). Every variant is compiled first; then the variants are timed
round-robin, --repeats rounds, and the median per variant is reported, so contention on a
shared machine affects every variant alike. Columns, each relative to the dense model:
  time     median forward time / dense's;
  MACs     the sown MACs per token (what evaluation reports as compute), the ideal time ratio
           if time were proportional to arithmetic;
  XLA      XLA's compiled FLOP count (cost_analysis), gather/scatter included.
Parameters are random (timing does not depend on their values; routing decisions do not change
the shapes). With --train_steps it also times one optimizer step of each training stage
(informed stage 1, informed stage 2, MoD fine-tuning in masked and in gather compute, dense
fine-tuning), round-robin likewise, for the training-time comparison.
Prints Markdown tables and writes the rows as JSON to --output.
"""
import json
import statistics
import time

from absl import flags

from adacomp import cli

flags.DEFINE_list("sparsities", ["0", "0.25", "0.5", "0.75"], "Fractions of tokens skipped.")
flags.DEFINE_list("units", ["ffn"], "Routed units: ffn, attention or both.")
flags.DEFINE_integer("batch", 16, "Sequences per forward pass.")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_integer("num_layers", 4, "Decoder layers.")
flags.DEFINE_integer("d_model", 128, "Model width.")
flags.DEFINE_integer("d_ff", 512, "FFN width.")
flags.DEFINE_integer("num_heads", 4, "Attention heads.")
flags.DEFINE_integer("head_dim", 32, "Head width.")
flags.DEFINE_integer("vocab_size", 259, "Vocabulary (the byte tokenizer's).")
flags.DEFINE_integer("repeats", 20, "Timed rounds (median).")
flags.DEFINE_bool("train_steps", False, "Also time one training step of each stage.")
flags.DEFINE_float("train_sparsity", 0.5, "Sparsity of the timed router / MoD stages.")
flags.DEFINE_string("output", None, "JSON output path.")
FLAGS = flags.FLAGS


def _median_times(fns, repeats):
  """Round-robin timing: every round calls each function once; median seconds per function."""
  import jax  # pylint: disable=g-import-not-at-top
  for fn in fns.values():  # compile and warm up
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for r in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
    if (r + 1) % 5 == 0 or r + 1 == repeats:
      print(f"  round {r + 1}/{repeats}", flush=True)
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  import dataclasses  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from adacomp import scoring, training  # pylint: disable=g-import-not-at-top
  from adacomp.models.decoder import DecoderConfig, DecoderLM  # pylint: disable=g-import-not-at-top
  from layers.routing import RoutedAttention, RoutedFFN  # pylint: disable=g-import-not-at-top

  bad = set(FLAGS.units) - {"ffn", "attention"}
  if bad or not FLAGS.units:
    raise ValueError(f"--units={FLAGS.units}: use ffn, attention or both (comma-separated).")
  base = DecoderConfig(vocab_size=FLAGS.vocab_size, num_layers=FLAGS.num_layers,
                       d_model=FLAGS.d_model, num_heads=FLAGS.num_heads,
                       head_dim=FLAGS.head_dim, d_ff=FLAGS.d_ff,
                       max_len=max(1024, FLAGS.seq_len))

  def config(mode, sparsity, compute="gather", **kw):
    if mode == "dense":
      return base
    routed = dict(mode=mode, sparsity=sparsity, compute=compute, **kw)
    changes = {}
    if "ffn" in FLAGS.units:
      changes["ffn_cls"] = functools.partial(RoutedFFN, **routed)
    if "attention" in FLAGS.units:
      changes["attention_cls"] = functools.partial(RoutedAttention, **routed)
    return dataclasses.replace(base, **changes)

  ids = jax.random.randint(jax.random.key(0), (FLAGS.batch, FLAGS.seq_len), 0, FLAGS.vocab_size)

  def build(cfg):
    model = DecoderLM(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), ids)["params"])
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
    compiled = forward.lower(params, ids).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    _, state = compiled(params, ids)
    macs = float(jnp.mean(scoring.macs_per_token(state["intermediates"], ids.shape)))
    return (lambda: compiled(params, ids)[0]), float(cost["flops"]), macs

  variants = {("dense", 0.0): build(base)}
  for mode in ("informed", "greedy"):
    for s in map(float, FLAGS.sparsities):
      variants[(mode, s)] = build(config(mode, s))
  print(f"Timing {len(variants)} forward variants, {FLAGS.repeats} rounds "
        f"(batch {FLAGS.batch} x {FLAGS.seq_len}, units {','.join(FLAGS.units)}, "
        f"{jax.devices()[0].platform})", flush=True)
  times = _median_times({k: v[0] for k, v in variants.items()}, FLAGS.repeats)
  dense_t, dense_flops, dense_macs = times[("dense", 0.0)], *variants[("dense", 0.0)][1:]
  rows = []
  for (mode, s), (_, flops, macs) in variants.items():
    rows.append({"mode": mode, "sparsity": s, "ms": 1000 * times[(mode, s)],
                 "time_ratio": times[(mode, s)] / dense_t, "macs_ratio": macs / dense_macs,
                 "xla_flops_ratio": flops / dense_flops})
  print("\n| routing | sparsity | forward ms | time / dense | MACs / dense (ideal) | "
        "XLA FLOPs / dense |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['mode']} | {r['sparsity']:.0%} | {r['ms']:.1f} | {r['time_ratio']:.3f} | "
          f"{r['macs_ratio']:.3f} | {r['xla_flops_ratio']:.3f} |")
  result = {"forward": rows}

  if FLAGS.train_steps:
    s = FLAGS.train_sparsity
    stages = {
        "informed stage 1 (forecasters)": (config("informed", 0.0, "masked", distill_weight=1.0),
                                           "forecaster", 0.0),
        "informed stage 2 (routers)": (config("informed", s, "masked"), "router", 1.0),
        "MoD fine-tuning (masked)": (config("greedy", s, "masked"), None, 1.0),
        "MoD fine-tuning (gather)": (config("greedy", s, "gather"), None, 1.0),
        "dense fine-tuning": (base, None, 1.0),
    }
    batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1),
             "weights": jnp.ones(ids.shape, jnp.float32),
             "target_bytes": jnp.ones(ids.shape, jnp.int32)}
    steps = {}
    for name, (cfg, trainable, task_weight) in stages.items():
      model = DecoderLM(cfg)
      params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), ids)["params"])
      tx = training.make_optimizer(100, trainable=trainable)
      state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=tx.init(params))
      step = jax.jit(training.make_train_step(model, tx, 0, task_loss_weight=task_weight))
      compiled = step.lower(state, batch).compile()
      # The same state every call: the timing does not depend on the parameter values.
      steps[name] = functools.partial(lambda c, st: c(st, batch)[1]["loss"], compiled, state)
    print(f"Timing {len(steps)} training steps (sparsity {s:.0%}), {FLAGS.repeats} rounds",
          flush=True)
    step_times = _median_times(steps, FLAGS.repeats)
    print("\n| training stage | step ms (median) |\n|---|---|")
    for name, t in step_times.items():
      print(f"| {name} | {1000 * t:.1f} |")
    result["train_step_ms"] = {k: 1000 * v for k, v in step_times.items()}
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(result, f, indent=2)
    print(f"\nWrote {FLAGS.output}")


if __name__ == "__main__":
  cli.run(main)
