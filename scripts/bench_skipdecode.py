r"""SkipDecode generation throughput and quality against the FLOP-ratio ideal (a benchmark).

  python scripts/bench_skipdecode.py --checkpoint_dir=/tmp/adacomp/dense_deep \
      --finetuned=2:/tmp/adacomp/skip2x,3:/tmp/adacomp/skip3x,5:/tmp/adacomp/skip5x

For batch sizes 1, 8, 32 and schedules dense / 2x / 3x / 5x (linear decay from every layer at
the end of the prompt to the schedule's minimum at the last position), it times generation
(compiled once, then the median of --repeats runs) and reports tokens/s, the speed-up over the
dense schedule and the ideal speed-up (layers / mean active layers over generated positions).
Quality: validation loss on the generated span (positions >= prompt length) of windows of
prompt + new tokens, each schedule applied as a layer mask, using the checkpoint fine-tuned for
that speed-up when --finetuned names one, else the base checkpoint (no fine-tuning).
Writes a JSON table beside the printout with --output.
"""
import json
import statistics
import time

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_string("checkpoint_dir", None, "Base (dense) checkpoint.")
flags.DEFINE_string("finetuned", "", "speedup:checkpoint_dir pairs, comma-separated.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Generation batch sizes.")
flags.DEFINE_list("speedups", ["1", "2", "3", "5"], "Target speed-ups (1 = dense schedule).")
flags.DEFINE_integer("prompt_len", 32, "Prompt length (runs every layer).")
flags.DEFINE_integer("new_tokens", 96, "Generated tokens per sequence.")
flags.DEFINE_integer("repeats", 3, "Timed runs per cell (median).")
flags.DEFINE_integer("eval_batches", 16, "Validation batches for the quality column.")
flags.DEFINE_string("output", None, "JSON output path.")
flags.mark_flag_as_required("checkpoint_dir")
FLAGS = flags.FLAGS


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO
  del argv
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from adacomp import checkpointing, decoding, evaluation, gin_utils, skip_schedule  # pylint: disable=g-import-not-at-top
  from adacomp import data as data_lib  # pylint: disable=g-import-not-at-top
  from adacomp.training import make_eval_step  # pylint: disable=g-import-not-at-top

  _, meta = checkpointing.read_meta(FLAGS.checkpoint_dir)
  gin_utils.parse([], [], finalize=False)
  gin.parse_config(meta["gin_config"])
  gin.bind_parameter("layer_mask_for_training.schedule", None)
  decoder, base_params, _, _ = decoding.load_checkpoint_for_decoding(FLAGS.checkpoint_dir)
  finetuned = dict(item.split(":", 1) for item in FLAGS.finetuned.split(",") if item)
  layers = decoder.config.num_layers
  total = FLAGS.prompt_len + FLAGS.new_tokens
  print(f"Model: {layers} layers, d_model {decoder.config.d_model}; prompt {FLAGS.prompt_len} + "
        f"{FLAGS.new_tokens} new tokens; device {jax.devices()[0].device_kind}", flush=True)

  schedules = {}
  for s in map(float, FLAGS.speedups):
    schedules[s] = (skip_schedule.full_schedule(total, layers) if s == 1.0 else
                    skip_schedule.schedule_for_speedup(s, total, layers,
                                                       warmup_len=FLAGS.prompt_len))

  rows = []
  val = data_lib.lm_dataset("validation", batch_size=8, seq_len=total, train=False,
                            eval_max_batches=FLAGS.eval_batches)
  for s, schedule in schedules.items():
    ideal = skip_schedule.mean_speedup(schedule, layers, start=FLAGS.prompt_len)
    ckpt = finetuned.get(f"{s:g}")
    params = base_params
    if ckpt:
      params = checkpointing.restore_params(ckpt, jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params))
    mask = skip_schedule.active_layer_mask(schedule, layers, decoder.warmup_layers)
    model = decoding_model(decoder.config)
    eval_step = jax.jit(make_eval_step(model, mask))

    def span_only(batch):
      batch = dict(batch)
      batch["weights"] = batch["weights"] * (np.arange(total) >= FLAGS.prompt_len)[None]
      return batch

    quality = evaluation.evaluate(eval_step, params, (span_only(b) for b in val),
                                  lambda b: {k: jnp.asarray(v) for k, v in b.items()})
    for batch in map(int, FLAGS.batch_sizes):
      prompt = jax.random.randint(jax.random.key(batch), (batch, FLAGS.prompt_len), 0, 256)
      run = lambda: jax.block_until_ready(decoding.generate(  # pylint: disable=cell-var-from-loop
          decoder, params, prompt, jnp.asarray(schedule), jax.random.key(0),
          max_new_tokens=FLAGS.new_tokens))
      run()
      times = []
      for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
      seconds = statistics.median(times)
      rows.append({"speedup_target": s, "batch": batch, "ideal_speedup": ideal,
                   "tokens_per_s": batch * FLAGS.new_tokens / seconds, "seconds": seconds,
                   "loss_generated_span": quality["loss"],
                   "bits_per_byte_generated_span": quality["bits_per_byte"],
                   "finetuned": bool(ckpt)})
      print(f"  schedule {s:g}x batch {batch}: {rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)

  dense = {r["batch"]: r["tokens_per_s"] for r in rows if r["speedup_target"] == 1.0}
  print("\n| schedule | fine-tuned | batch | tokens/s | measured speed-up | ideal | "
        "measured/ideal | bits/byte (generated span) |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    measured = r["tokens_per_s"] / dense[r["batch"]] if r["batch"] in dense else float("nan")
    r["measured_speedup"] = measured
    print(f"| {r['speedup_target']:g}x | {'yes' if r['finetuned'] else 'no'} | {r['batch']} | "
          f"{r['tokens_per_s']:.0f} | {measured:.2f}x | {r['ideal_speedup']:.2f}x | "
          f"{measured / r['ideal_speedup']:.2f} | {r['bits_per_byte_generated_span']:.4f} |")
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(rows, f, indent=2)


def decoding_model(config):
  from adacomp.models.decoder import DecoderLM  # pylint: disable=g-import-not-at-top
  return DecoderLM(config)


if __name__ == "__main__":
  app.run(main)
