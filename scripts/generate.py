r"""Generates continuations of prompts with a trained checkpoint, optionally under SkipDecode.

  python scripts/generate.py --checkpoint_dir=/tmp/adacomp/dense --prompts=docs/prompts.txt \
      --max_new_tokens=64 --speedup=2 --temperature=0.8 --top_p=0.95

One prompt per line of --prompts; prompts are cut to the shortest one's length so that a batch
shares positions (SkipDecode's batch-uniform exit points). Writes JSONL to --output.
"""
import json
import time

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
flags.mark_flags_as_required(["checkpoint_dir", "prompts"])
FLAGS = flags.FLAGS


def main():
  # pylint: disable=g-import-not-at-top
  import os
  import jax
  import jax.numpy as jnp
  import numpy as np
  from adacomp import decoding, gin_utils
  from adacomp.methods import registry  # pylint: disable=unused-import
  from adacomp.methods.skipdecode import schedule as skip_schedule

  prompts = FLAGS.prompts
  if not os.path.isfile(prompts) and os.path.isfile(os.path.join(gin_utils.REPO_ROOT, prompts)):
    prompts = os.path.join(gin_utils.REPO_ROOT, prompts)  # e.g. docs/prompts.txt from anywhere
  if not os.path.isfile(prompts):
    raise ValueError(f"--prompts={FLAGS.prompts}: no such file; write one prompt per line "
                     f"(docs/prompts.txt is an example).")
  lines = [l.rstrip("\n") for l in open(prompts, encoding="utf-8") if l.strip()]
  if not lines:
    raise ValueError(f"--prompts={FLAGS.prompts} holds no prompt; write one prompt per line.")
  gin_utils.parse_checkpoint_config(FLAGS.checkpoint_dir)
  decoder, params, tokenizer, meta = decoding.load_checkpoint_for_decoding(FLAGS.checkpoint_dir)
  encoded = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(l)]) for l in lines]
  length = min(len(e) for e in encoded)
  prompt = jnp.asarray(np.stack([e[:length] for e in encoded]), jnp.int32)
  total = length + FLAGS.max_new_tokens
  layers = decoder.config.num_layers
  if FLAGS.speedup > 1.0:
    schedule = skip_schedule.schedule_for_speedup(total, layers, speedup=FLAGS.speedup,
                                                  warmup_len=length,
                                                  warmup_layers=FLAGS.warmup_layers)
  else:
    schedule = skip_schedule.full_schedule(total, layers)
  decoder.warmup_layers = FLAGS.warmup_layers
  sampling = decoding.SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  start = time.time()
  tokens = jax.block_until_ready(decoding.generate(
      decoder, params, prompt, jnp.asarray(schedule), jax.random.key(FLAGS.seed),
      max_new_tokens=FLAGS.max_new_tokens, sampling=sampling))
  elapsed = time.time() - start
  output = FLAGS.output or f"{FLAGS.checkpoint_dir.rstrip('/')}/generations.jsonl"
  with open(output, "w", encoding="utf-8") as f:
    for line, row in zip(lines, np.asarray(tokens)):
      text = tokenizer.decode(row[length:])
      f.write(json.dumps({"prompt": line, "prompt_used": tokenizer.decode(row[1:length]),
                          "generation": text}) + "\n")
      print(f"--- {line[:60]!r}\n{text}\n")
  mean_active = float(np.mean(schedule[length:]))
  print(f"{len(lines)} prompts x {FLAGS.max_new_tokens} tokens in {elapsed:.2f}s (incl. compile); "
        f"mean active layers {mean_active:.2f}/{layers} (ideal speedup "
        f"{layers / mean_active:.2f}x). Wrote {output}")


if __name__ == "__main__":
  cli.run(main)
