r"""Generates continuations of prompts with a trained checkpoint, optionally under SkipDecode.

  python scripts/generate.py --checkpoint_dir=/tmp/adacomp/dense --prompts=docs/prompts.txt \
      --max_new_tokens=64 --speedup=2 --temperature=0.8 --top_p=0.95

One prompt per line of --prompts, each used whole (rows keep their own positions; the longest
prompt's positions run every layer, then the SkipDecode schedule, batch-uniform, applies). A row
stops at its EOS or after --max_new_tokens. Writes one JSONL row per prompt to --output:
prompt, continuation, ids and logprobs of the generated tokens, macs_per_token, tokens_per_s.
Routed models (informed routing, Mixture-of-Depths) decode with causal decisions (each token
by its causal predictor and threshold; a unit a token does not execute costs it nothing in that
step), in gather compute; --gin_bindings apply over the saved config after that.
"""
import json

from absl import flags

from adacomp import cli

flags.DEFINE_string("checkpoint_dir", None, "A training --workdir or its checkpoints/ folder.")
flags.DEFINE_string("prompts", None, "Text file, one prompt per line.")
flags.DEFINE_string("output", None, "JSONL output (default: <checkpoint_dir>/generations.jsonl).")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.")
flags.DEFINE_float("speedup", 1.0, "SkipDecode target: layers / mean active layers (1 = dense).")
flags.DEFINE_integer("warmup_layers", 1, "Bottom layers that always run.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
flags.DEFINE_float("top_p", None, "Keep the smallest set of tokens with this much mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied over the saved config.")
flags.mark_flags_as_required(["checkpoint_dir", "prompts"])
FLAGS = flags.FLAGS


def main():
  # pylint: disable=g-import-not-at-top
  import os
  import jax
  import numpy as np
  from adacomp import decoding, gin_utils
  from adacomp.methods import registry  # pylint: disable=unused-import
  from adacomp.methods.skipdecode import schedule as skip_schedule
  from adacomp import checkpointing, data
  from adacomp.methods.informed_routing import factories
  from adacomp.models import build

  prompts = FLAGS.prompts
  if not os.path.isfile(prompts) and os.path.isfile(os.path.join(gin_utils.REPO_ROOT, prompts)):
    prompts = os.path.join(gin_utils.REPO_ROOT, prompts)  # e.g. docs/prompts.txt from anywhere
  if not os.path.isfile(prompts):
    raise ValueError(f"--prompts={FLAGS.prompts}: no such file; write one prompt per line "
                     f"(docs/prompts.txt is an example).")
  lines = [l.rstrip("\n") for l in open(prompts, encoding="utf-8") if l.strip()]
  if not lines:
    raise ValueError(f"--prompts={FLAGS.prompts} holds no prompt; write one prompt per line.")
  if FLAGS.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={FLAGS.max_new_tokens}: generate at least one token.")
  bindings = factories.decision_bindings("causal") + [
      "routed_ffn.compute = 'gather'", "routed_attention.compute = 'gather'"]
  step, meta = gin_utils.parse_checkpoint_config(FLAGS.checkpoint_dir,
                                                 gin_bindings=bindings + FLAGS.gin_bindings)
  model, params = build.load_decoder(FLAGS.checkpoint_dir, meta, step)
  layers = model.config.num_layers

  def schedule_fn(total, prompt_width):
    if FLAGS.speedup > 1.0:
      return skip_schedule.schedule_for_speedup(total, layers, speedup=FLAGS.speedup,
                                                warmup_len=prompt_width,
                                                warmup_layers=FLAGS.warmup_layers)
    return skip_schedule.full_schedule(total, layers)

  rows, stats = decoding.generate_rows(
      model, params, data.get_tokenizer(), lines, schedule_fn, jax.random.key(FLAGS.seed),
      max_new_tokens=FLAGS.max_new_tokens,
      sampling=decoding.SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p),
      warmup_layers=FLAGS.warmup_layers,
      layer_mask_fn=lambda s: skip_schedule.active_layer_mask(s, layers, FLAGS.warmup_layers))
  output = FLAGS.output or os.path.join(
      str(checkpointing.checkpoint_root(FLAGS.checkpoint_dir).parent), "generations.jsonl")
  with open(output, "w", encoding="utf-8") as f:
    for row in rows:
      row["tokens_per_s"] = stats["tokens_per_s"]
      f.write(json.dumps(row) + "\n")
      print(f"--- {row['prompt'][:60]!r}\n{row['continuation']}\n")
  macs = float(np.mean([r["macs_per_token"] for r in rows]))
  active = float(np.mean(stats["schedule"][stats["prompt_width"]:]))
  print(f"{len(rows)} prompts, {stats['generated_tokens']} tokens at "
        f"{stats['tokens_per_s']:,.0f} tokens/s (compile {stats['compile_s']:.1f}s excluded); "
        f"{macs / 1e6:.3f} MMACs per generated token; mean active layers after the prompts "
        f"{active:.2f}/{layers} (ideal speedup {layers / active:.2f}x). Wrote {output}")


if __name__ == "__main__":
  cli.run(main)
