r"""SkipDecode generation throughput and quality against the FLOP-ratio ideal (a benchmark).

  python scripts/bench_skipdecode.py --checkpoint_dir=/tmp/adacomp/dense_deep \
      --finetuned=2:/tmp/adacomp/skip2x,3:/tmp/adacomp/skip3x,5:/tmp/adacomp/skip5x

For each target speed-up (1 = the dense schedule) it builds the linear schedule whose mean
active-layer count over the generated positions is layers / target (`schedule_for_speedup`;
the prompt runs every layer), then:
- times `decoding.generate` end to end (prefill of the prompt, then token-by-token decoding;
  compiled once, median of --repeats runs taken round-robin over the schedules) at each batch
  size and reports new tokens/s and the
  measured speed-up over the dense schedule at the same batch size;
- reports the ideal speed-up, layers / mean active layers over the generated positions;
- measures quality on validation windows of prompt + new tokens: bits per byte of the generated
  span (positions >= prompt length) with the schedule applied as a layer mask, for the base
  checkpoint as is and for the checkpoint fine-tuned for that target (--finetuned).
Prints a markdown table and writes the rows as JSON to --output.
"""
import json
import statistics
import sys
import time

from absl import flags

from adacomp import cli

flags.DEFINE_string("checkpoint_dir", None, "Base (dense) checkpoint.")
flags.DEFINE_string("finetuned", "", "target:checkpoint_dir pairs, comma-separated.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Generation batch sizes.")
flags.DEFINE_list("speedups", ["1", "2", "3", "5"], "Target speed-ups (1 = dense schedule).")
flags.DEFINE_integer("prompt_len", 32, "Prompt length (runs every layer).")
flags.DEFINE_integer("new_tokens", 96, "Generated tokens per sequence.")
flags.DEFINE_integer("warmup_layers", 1, "Bottom layers every position runs.")
flags.DEFINE_integer("repeats", 3, "Timed runs per cell (median).")
flags.DEFINE_integer("eval_batches", 16, "Validation batches (of 8 windows) for quality.")
flags.DEFINE_string("output", None, "JSON output path.")
flags.mark_flag_as_required("checkpoint_dir")
FLAGS = flags.FLAGS


def main():
  from adacomp.methods import registry  # pylint: disable=g-import-not-at-top,unused-import
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from adacomp import checkpointing, decoding, gin_utils, scoring  # pylint: disable=g-import-not-at-top
  from adacomp.methods.skipdecode import schedule as skip_schedule  # pylint: disable=g-import-not-at-top
  from adacomp import data as data_lib  # pylint: disable=g-import-not-at-top
  from adacomp.models.decoder import DecoderLM  # pylint: disable=g-import-not-at-top
  from adacomp.training import make_eval_step  # pylint: disable=g-import-not-at-top

  try:
    gin_utils.parse_checkpoint_config(FLAGS.checkpoint_dir)
    decoder, base_params, _, _ = decoding.load_checkpoint_for_decoding(FLAGS.checkpoint_dir)
    finetuned = {float(k): v for k, v in
                 (item.split(":", 1) for item in FLAGS.finetuned.split(",") if item)}
  except ValueError as e:
    print(f"ERROR: {e} (--finetuned takes target:checkpoint_dir pairs, e.g. 2:/tmp/skip2x)",
          file=sys.stderr)
    sys.exit(1)
  decoder.warmup_layers = FLAGS.warmup_layers
  layers = decoder.config.num_layers
  total = FLAGS.prompt_len + FLAGS.new_tokens
  print(f"Model: {layers} layers, d_model {decoder.config.d_model}; prompt {FLAGS.prompt_len} + "
        f"{FLAGS.new_tokens} new tokens; device {jax.devices()[0].device_kind}", flush=True)

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)
  val = data_lib.lm_dataset("validation", batch_size=8, seq_len=total, train=False,
                            eval_max_batches=FLAGS.eval_batches)
  span = (np.arange(total) >= FLAGS.prompt_len)[None].astype(np.float32)

  def quality(params, mask):
    eval_step = jax.jit(make_eval_step(DecoderLM(decoder.config), mask))
    batches = ({**b, "weights": b["weights"] * span} for b in val)
    return scoring.evaluate(eval_step, params, batches,
                               lambda b: {k: jnp.asarray(v) for k, v in b.items()})

  rows = []
  for target in map(float, FLAGS.speedups):
    schedule = (skip_schedule.full_schedule(total, layers) if target == 1.0 else
                skip_schedule.schedule_for_speedup(total, layers, speedup=target,
                                                   warmup_len=FLAGS.prompt_len,
                                                   warmup_layers=FLAGS.warmup_layers))
    mask = skip_schedule.active_layer_mask(schedule, layers, FLAGS.warmup_layers)
    row = {"target": target, "schedule": schedule.tolist(),
           "mean_active_layers": float(np.mean(schedule[FLAGS.prompt_len:])),
           "ideal_speedup": skip_schedule.mean_speedup(schedule, layers, FLAGS.prompt_len),
           "bpb_base": quality(base_params, mask)["bits_per_byte"], "bpb_finetuned": None,
           "tokens_per_s": {}}
    if target in finetuned:
      params = checkpointing.restore_params(finetuned[target], abstract)
      row["bpb_finetuned"] = quality(params, mask)["bits_per_byte"]
    print(f"  {target:g}x schedule: bits/byte {row['bpb_base']:.3f} as is, "
          f"{row['bpb_finetuned'] or float('nan'):.3f} fine-tuned", flush=True)
    rows.append(row)

  # Timed runs go round-robin over the schedules, so load that drifts during the benchmark
  # affects every schedule alike.
  for batch in map(int, FLAGS.batch_sizes):
    prompt = jax.random.randint(jax.random.key(batch), (batch, FLAGS.prompt_len), 0, 256)
    runs = []
    for row in rows:
      sched = jnp.asarray(row["schedule"], jnp.int32)
      runs.append(lambda sched=sched: jax.block_until_ready(decoding.generate(
          decoder, base_params, prompt, sched, jax.random.key(0),
          max_new_tokens=FLAGS.new_tokens)))
      runs[-1]()
    times = [[] for _ in rows]
    for _ in range(FLAGS.repeats):
      for run, bucket in zip(runs, times):
        start = time.perf_counter()
        run()
        bucket.append(time.perf_counter() - start)
    for row, bucket in zip(rows, times):
      row["tokens_per_s"][batch] = batch * FLAGS.new_tokens / statistics.median(bucket)
    print(f"  batch {batch}: " + ", ".join(
        f"{r['target']:g}x {r['tokens_per_s'][batch]:,.0f} tok/s" for r in rows), flush=True)

  dense = next((r for r in rows if r["target"] == 1.0), None)
  batches = list(map(int, FLAGS.batch_sizes))
  head = " | ".join(f"batch {b}: tok/s (speed-up)" for b in batches)
  print(f"\n| target | mean active layers | ideal speed-up | {head} | bits/byte, no fine-tune | "
        f"bits/byte, fine-tuned |")
  print("|---|---|---|" + "---|" * len(batches) + "---|---|")
  for r in rows:
    cells = []
    for b in batches:
      measured = r["tokens_per_s"][b] / dense["tokens_per_s"][b] if dense else float("nan")
      r.setdefault("measured_speedup", {})[b] = measured
      cells.append(f"{r['tokens_per_s'][b]:,.0f} ({measured:.2f}x)")
    tuned = "-" if r["bpb_finetuned"] is None else f"{r['bpb_finetuned']:.3f}"
    print(f"| {r['target']:g}x | {r['mean_active_layers']:.2f} / {layers} | "
          f"{r['ideal_speedup']:.2f}x | {' | '.join(cells)} | {r['bpb_base']:.3f} | {tuned} |")
  if FLAGS.output:
    with open(FLAGS.output, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)
    print(f"Wrote {FLAGS.output}")


if __name__ == "__main__":
  cli.run(main)
