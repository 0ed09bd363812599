r"""Generation tokens/s of every LM method against its dense reference and its MAC ratio.

  python scripts/bench_generate.py --repeats=5 --output=/tmp/bench_generate.json

For each size (--sizes: tiny = configs/sizes/tiny.gin's 4 x d128; d512 = 4 layers, d_model 512,
8 heads x 64, d_ff 2048) and batch size (--batch_sizes), every method's model (random
parameters, float32) generates --new_tokens greedy tokens after a --prompt_len prompt with
`decoding.generate` (prefill, then KV-cache steps; compiled once, excluded). The methods are
the gin configs as scripts/generate.py decodes them: routed units (informed routing, MoD) with
causal decisions in gather compute; SkipDecode variants under `schedule_for_speedup(2)` on the
dense weights. Each random causal predictor's threshold is set to the median of its logits on
a random batch (`_calibrate`: about half the tokens execute, as a trained 50% model's
calibrated threshold does); the MAC ratio is measured from the layers' sown MACs over the
generated positions under the same decisions, so time and MACs describe the same computation.

Timings are medians of --repeats rounds taken round-robin over the methods (load on the shared
machine hits all alike). Prints a markdown table; --output writes the rows as JSON.
"""
import json
import statistics
import time

from absl import flags

from adacomp import cli

flags.DEFINE_list("sizes", ["tiny", "d512"], "Model sizes: tiny, d512.")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Generation batch sizes.")
flags.DEFINE_list("methods", None, "Subset of the methods (default: all).")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens (prefilled through every layer).")
flags.DEFINE_integer("new_tokens", 32, "Generated tokens per row.")
flags.DEFINE_integer("repeats", 5, "Timed rounds (median).")
flags.DEFINE_string("output", None, "JSON output path.")
FLAGS = flags.FLAGS

CAUSAL = ["routed_ffn.decision = 'causal'", "routed_ffn.compute = 'gather'",
          "routed_attention.decision = 'causal'", "routed_attention.compute = 'gather'"]
SKIP = ["position_layer_mask.fn = @layer_mask_for_training",
        "layer_mask_for_training.schedule = @schedule_for_speedup",
        "schedule_for_speedup.speedup = 2.0", "layer_mask_for_training.warmup_layers = 1"]
ROUTED_ATTENTION = ["DecoderConfig.attention_cls = @routed_attention()",
                    "routed_attention.mode = 'greedy'", "routed_attention.sparsity = %SPARSITY"]
# name: (config, bindings, dense reference)
METHODS = {
    "dense": ("dense.gin", [], "dense"),
    "skipdecode 2x": ("dense.gin", SKIP, "dense"),
    "informed 50%": ("informed_routing.gin", CAUSAL, "dense"),
    "MoD 50% (FFN)": ("mod.gin", CAUSAL, "dense"),
    # The same decisions with the unit run on every token and masked: no saving.
    "MoD 50% (FFN), masked": ("mod.gin", CAUSAL + ["routed_ffn.compute = 'masked'"], "dense"),
    "MoD 50% (FFN + attention)": ("mod.gin", CAUSAL + ROUTED_ATTENTION, "dense"),
    "MoD 50% + skipdecode 2x": ("mod.gin", CAUSAL + SKIP, "dense"),
    "Duo router": ("duo_router.gin", [], "dense"),
    "TokenFormer": ("tokenformer.gin", [], "dense"),
}
SIZES = {
    "tiny": [],
    "d512": ["DecoderConfig.d_model = 512", "DecoderConfig.num_heads = 8",
             "DecoderConfig.head_dim = 64", "DecoderConfig.d_ff = 2048",
             "tokenformer_attention.n_qkv = 256", "tokenformer_attention.n_out = 256",
             "tokenformer_ffn.n_ffn = 2048"],
}


def _calibrate(model, params, tokens):
  """Sets every `causal_threshold` to the median causal-predictor logit of its unit on
  `tokens` (per layer), the threshold a trained 50%-sparsity model calibrates to."""
  # pylint: disable=g-import-not-at-top
  import flax
  import jax.numpy as jnp
  _, state = model.apply({"params": params}, tokens,
                         capture_intermediates=lambda mdl, method: (
                             mdl.name == "causal" and method == "__call__"),
                         mutable=["intermediates"])
  flat = flax.traverse_util.flatten_dict(params)
  for path, logits in flax.traverse_util.flatten_dict(state["intermediates"]).items():
    if path[-2:] != ("causal", "__call__"):
      continue  # the sown macs and decisions
    unit = path[:-2]
    logits = logits[0][..., 0]  # scanned: [layers, b, t]
    axes = tuple(range(logits.ndim - 2, logits.ndim))
    flat[unit + ("causal_threshold",)] = jnp.median(logits, axis=axes)
  return flax.traverse_util.unflatten_dict(flat)


def _variant(name, size, batch, prompt_len, new_tokens):
  """(fn, args, macs per generated token) of one method at one size and batch."""
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import gin
  import jax
  import jax.numpy as jnp
  import numpy as np
  from adacomp import decoding, gin_utils, scoring, tasks
  from adacomp.methods import registry  # pylint: disable=unused-import
  from adacomp.methods.skipdecode import schedule as skip_schedule
  from adacomp.models import build
  config, bindings, _ = METHODS[name]
  total = prompt_len + new_tokens
  gin.clear_config()
  skip = ([f"schedule_for_speedup.warmup_len = {prompt_len}"]
          if any(b.startswith("position_layer_mask.fn") for b in bindings) else [])
  gin_utils.parse([f"configs/{config}"], SIZES[size] + bindings + skip)
  model = build.build_decoder(259)
  layers = model.config.num_layers
  mask = tasks.position_layer_mask(total, layers)
  gin.clear_config()
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  schedule = (skip_schedule.full_schedule(total, layers) if mask is None else
              np.asarray(mask).sum(0).astype(np.int32))
  decoder = decoding.Decoder(model.config, warmup_layers=1)
  prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 1, 256)
  params = _calibrate(model, params, jax.random.randint(jax.random.key(2), (8, total), 1, 256))

  @jax.jit
  def run(p, prompt, schedule):
    return decoding.generate(decoder, p, prompt, schedule, jax.random.key(0),
                             max_new_tokens=new_tokens).tokens

  args = (params, prompt, jnp.asarray(schedule))
  tokens = jax.block_until_ready(run(*args))
  _, state = model.apply({"params": params}, tokens, layer_mask=None if mask is None else
                         jnp.asarray(mask), mutable=["intermediates"])
  macs = np.asarray(scoring.macs_per_token(state["intermediates"], tokens.shape, mask))
  return run, args, float(macs[:, prompt_len:].mean())


def main():
  methods = FLAGS.methods or list(METHODS)
  rows = []
  for size in FLAGS.sizes:
    for batch in map(int, FLAGS.batch_sizes):
      cells = {}
      for name in methods:
        try:
          cells[name] = _variant(name, size, batch, FLAGS.prompt_len, FLAGS.new_tokens)
        except Exception as e:  # pylint: disable=broad-except
          print(f"{name} at {size}, batch {batch}: not measured ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]})", flush=True)
      times = {name: [] for name in cells}
      for _ in range(FLAGS.repeats):
        for name, (fn, args, _) in cells.items():
          start = time.perf_counter()
          fn(*args).block_until_ready()
          times[name].append(time.perf_counter() - start)
      for name, (_, _, macs) in cells.items():
        ref = METHODS[name][2]
        seconds = statistics.median(times[name])
        row = {"size": size, "batch": batch, "method": name, "reference": ref,
               "tokens_per_s": batch * FLAGS.new_tokens / seconds, "macs_per_token": macs}
        if ref in cells:
          row["time_ratio"] = seconds / statistics.median(times[ref])
          row["mac_ratio"] = macs / cells[ref][2]
        rows.append(row)
        print(json.dumps(row), flush=True)
  print("\n| size | batch | method | tokens/s | time / reference | MACs / reference |")
  print("|---|---:|---|---:|---:|---:|")
  for r in rows:
    ratios = (f"{r['time_ratio']:.2f} | {r['mac_ratio']:.3f}" if "time_ratio" in r
              else "- | -")
    print(f"| {r['size']} | {r['batch']} | {r['method']} | {r['tokens_per_s']:,.0f} | {ratios} |")
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump({"prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
                 "repeats": FLAGS.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
