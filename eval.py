r"""Evaluates a checkpoint with the gin config it was trained with.

Required: --checkpoint_dir (a training --workdir or its checkpoints/ folder).

  python eval.py --checkpoint_dir=/tmp/adacomp/dense
  python eval.py --checkpoint_dir=/tmp/adacomp/dense --split=test --eval_batches=all

Defaults repeat the run's own validation (its split, batch size and number of batches), so the
figure matches the last one training printed. Routed models (informed routing, MoD) are
evaluated with causal decisions by default (--routing=causal: what generation reaches);
--routing=topk gives the teacher-forced top-k figure (not causal) and the agreement of the
causal decisions with it. Prints loss, perplexity, bits per byte, token
accuracy and MACs/token (image classifiers: loss, top-1, compute fraction of the dense model,
kept tokens per stage, images/s) and writes them to a JSON report named after what was evaluated,
`<workdir>/eval_<split>_step<N>_<batches>.json` (`..._all.json` for the whole split), unless
--output says otherwise.
"""
from absl import flags

from adacomp import cli

flags.DEFINE_string("checkpoint_dir", None, "Required. A training --workdir or its "
                    "checkpoints/ folder.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("split", None, "Split to evaluate (default: validation).")
flags.DEFINE_string("eval_batches", None, "Batches to evaluate, or 'all' for the whole split "
                    "(default: as many as training's validation used).")
flags.DEFINE_string("output", None, "JSON report path (default: in the workdir, named after "
                    "the split, step and batches).")
flags.DEFINE_enum("routing", "causal", ["causal", "topk"], "Routed models (informed routing, "
                  "MoD): 'causal' decides each token by the causal predictor (the number a "
                  "generating model reaches); 'topk' is the teacher-forced per-sequence top-k "
                  "the units trained with (not causal), reported with its agreement with the "
                  "causal decisions.")
flags.DEFINE_multi_string("gin_file", [], "Extra gin files applied over the saved config.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied over the saved config.")
FLAGS = flags.FLAGS


def main():
  if not FLAGS.checkpoint_dir:
    raise ValueError("--checkpoint_dir is required: the --workdir of a training run.")
  from adacomp.methods.informed_routing import factories  # pylint: disable=g-import-not-at-top
  # The routing decision first: --gin_bindings may still override it.
  bindings = factories.decision_bindings(FLAGS.routing) + list(FLAGS.gin_bindings)
  if FLAGS.split is not None:
    bindings.append(f"evaluate_checkpoint.split = {FLAGS.split!r}")
  if FLAGS.eval_batches is not None:
    bindings.append(f"evaluate_checkpoint.eval_batches = {cli.whole_split(FLAGS.eval_batches)}")
  if FLAGS.output is not None:
    bindings.append(f"evaluate_checkpoint.output = {FLAGS.output!r}")
  from adacomp import evaluation, gin_utils  # pylint: disable=g-import-not-at-top
  from adacomp.methods import registry  # pylint: disable=g-import-not-at-top,unused-import
  step, meta = gin_utils.parse_checkpoint_config(
      FLAGS.checkpoint_dir, FLAGS.step, FLAGS.gin_file, bindings, finalize=True)
  report = evaluation.evaluate_checkpoint(FLAGS.checkpoint_dir, meta, step)
  print(f"\nStep {report['step']} on {report['split']}: {report['summary_line']}\n"
        f"Report: {report['output']}", flush=True)


if __name__ == "__main__":
  cli.run(main)
