r"""Quality vs compute and vs inference time for checkpoints of any method, on one split.

  python scripts/pareto.py --output_dir=/tmp/adacomp/pareto \
      --entry dense=/tmp/adacomp/dense \
      --entry "duo small=/tmp/adacomp/duo;duo_ffn.mode='small'" \
      --entry "duo router=/tmp/adacomp/duo_router;duo_ffn.compute='gather'"

Each --entry is label=CHECKPOINT_DIR, optionally followed by ;-separated gin bindings applied over
the checkpoint's saved config, and `ref=LABEL` to name its own dense reference. Otherwise the
first entry of each task (or the one given with --reference) is the reference: compute and time
are relative to it. Writes pareto.json, pareto.png and
one eval JSON per entry under --output_dir. Logic: adacomp/pareto.py.
"""

from absl import flags

from adacomp import cli

flags.DEFINE_multi_string("entry", [], "label=CHECKPOINT_DIR[;binding;...] (repeatable).")
flags.DEFINE_string("reference", None, "Label of the dense reference (default: the first entry "
                    "of each task).")
flags.DEFINE_string("output_dir", "/tmp/adacomp/pareto", "Where the table and plot go.")
flags.DEFINE_string("split", "validation", "Evaluation split, the same for every entry.")
flags.DEFINE_string("eval_batches", "8", "Batches per entry, or 'all' for the whole split.")
flags.DEFINE_integer("rounds", 10, "Interleaved timing rounds.")
flags.DEFINE_integer("batch_size", 8, "Rows of the timed batch.")
flags.DEFINE_integer("prompt_len", 32, "Prompt length when a SkipDecode entry is timed "
                     "generating.")
flags.DEFINE_string("image_bench", None, "JSON of scripts/bench_vit.py: image entries' timing.")
FLAGS = flags.FLAGS


def main():
  from adacomp.methods import registry  # pylint: disable=g-import-not-at-top,unused-import
  from adacomp import pareto  # pylint: disable=g-import-not-at-top
  entries = [pareto.parse_entry(e) for e in FLAGS.entry]
  if FLAGS.reference:
    if FLAGS.reference not in [e.label for e in entries]:
      raise ValueError(f"--reference={FLAGS.reference!r} is not one of the entry labels "
                       f"{[e.label for e in entries]}.")
    entries = [pareto.Entry(e.label, e.checkpoint_dir, e.bindings,
                            e.label == FLAGS.reference, e.ref) for e in entries]
  pareto.run_pareto(entries, FLAGS.output_dir, split=FLAGS.split,
                    eval_batches=cli.whole_split(FLAGS.eval_batches), rounds=FLAGS.rounds,
                    batch_size=FLAGS.batch_size, prompt_len=FLAGS.prompt_len,
                    image_bench=FLAGS.image_bench)


if __name__ == "__main__":
  cli.run(main)
