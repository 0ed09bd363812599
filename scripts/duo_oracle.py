r"""Duo-LLM oracle routing analysis of a checkpoint, with trained routers for comparison.

  python scripts/duo_oracle.py --checkpoint_dir=/tmp/adacomp/duo \
      --router_dir=/tmp/adacomp/duo_router --output_dir=/tmp/adacomp/duo_oracle

Searches the routing patterns (skip / small / big per layer) on held-out tokens, every one of
them up to 10 layers, a per-token local search beyond (--search) and writes analysis.json plus
loss_vs_compute.png, big_by_layer.png and difficulty.png into --output_dir; prints the headline
table (all big vs oracle with --headline_big big layers vs random vs the routers) and the
paper's findings checked. --gap_free_layers=4 --gap_free_layers=6 also measures the local
search's gap to the exhaustive oracle on that many layers of the model (3^m patterns each).
The logic lives in adacomp/methods/duo/analysis.py.
"""

from absl import flags

from adacomp import cli

flags.DEFINE_string("checkpoint_dir", None, "A Duo run trained with random routes.")
flags.DEFINE_multi_string("router_dir", [], "Router-stage runs to compare (repeatable).")
flags.DEFINE_string("output_dir", None, "Where the JSON and PNGs go (default: "
                    "<checkpoint_dir>/oracle).")
flags.DEFINE_string("split", "validation", "Held-out split.")
flags.DEFINE_integer("num_batches", 4, "Evaluation batches of held-out tokens.")
flags.DEFINE_integer("batch_size", None, "Default: the run's batch size.")
flags.DEFINE_integer("seq_len", None, "Default: the run's sequence length.")
flags.DEFINE_integer("headline_big", 1, "BIG-layer budget of the headline comparison.")
flags.DEFINE_integer("chunk", 9, "Patterns per vmapped forward pass.")
flags.DEFINE_enum("search", "auto", ["auto", "exhaustive", "local"],
                  "auto: exhaustive up to 3^L <= 100,000 patterns, the local search beyond.")
flags.DEFINE_integer("max_patterns", 2048, "Local search: patterns evaluated at most.")
flags.DEFINE_integer("per_round", 63, "Local search: patterns per round (a multiple of chunk).")
flags.DEFINE_integer("num_random", 100, "Random routings per budget (mean and best of N).")
flags.DEFINE_multi_integer("gap_free_layers", [], "Measure the local search's gap to the "
                           "exhaustive oracle on this many layers (repeatable).")
flags.DEFINE_multi_string("gin_bindings", [], "Bindings applied over the saved configs.")
flags.mark_flag_as_required("checkpoint_dir")
FLAGS = flags.FLAGS


def main():
  from adacomp.methods import registry  # pylint: disable=g-import-not-at-top,unused-import
  import os  # pylint: disable=g-import-not-at-top
  from adacomp.methods.duo import analysis as duo_analysis  # pylint: disable=g-import-not-at-top
  output_dir = FLAGS.output_dir or os.path.join(FLAGS.checkpoint_dir, "oracle")
  duo_analysis.run_analysis(
      FLAGS.checkpoint_dir, output_dir, router_dirs=FLAGS.router_dir, split=FLAGS.split,
      num_batches=FLAGS.num_batches, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
      headline_big=FLAGS.headline_big, chunk=FLAGS.chunk, bindings=FLAGS.gin_bindings,
      search=FLAGS.search, max_patterns=FLAGS.max_patterns, per_round=FLAGS.per_round,
      num_random=FLAGS.num_random, gap_free_layers=FLAGS.gap_free_layers)


if __name__ == "__main__":
  cli.run(main)
