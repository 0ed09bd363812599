r"""Evaluates a checkpoint with the gin config it was trained with.

  python eval.py --checkpoint_dir=/tmp/dense
  python eval.py --checkpoint_dir=/tmp/dense --gin_bindings="evaluate_checkpoint.split='test'" \
      --gin_bindings='evaluate_checkpoint.eval_batches=None'

Prints loss, perplexity, bits per byte, token accuracy and MACs/token (image classifiers: loss,
top-1, compute fraction of the dense model, kept tokens per stage, images/s) and writes them to a
JSON report
(`<workdir>/eval_<split>_step<N>.json` unless evaluate_checkpoint.output says otherwise).
"""
import sys

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_string("checkpoint_dir", None, "A training --workdir or its checkpoints/ folder.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_multi_string("gin_file", [], "Extra gin files applied over the saved config.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied over the saved config.")
flags.mark_flag_as_required("checkpoint_dir")
FLAGS = flags.FLAGS


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from adacomp import evaluator, gin_utils  # pylint: disable=g-import-not-at-top
  try:
    step, meta = gin_utils.parse_checkpoint_config(
        FLAGS.checkpoint_dir, FLAGS.step, FLAGS.gin_file, FLAGS.gin_bindings, finalize=True)
    report = evaluator.evaluate_checkpoint(FLAGS.checkpoint_dir, meta, step)
  except (ValueError, PermissionError) as e:
    print(f"\nERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"\nStep {report['step']} on {report['split']}: {report['summary_line']}\n"
        f"Report: {report['output']}", flush=True)


if __name__ == "__main__":
  app.run(main)
