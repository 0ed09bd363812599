r"""Trains an adacomp model from gin configs.

  python train.py --gin_file=configs/dense.gin --workdir=/tmp/dense
  python train.py --gin_file=configs/dense.gin --gin_file=configs/sizes/small.gin \
      --gin_bindings='train.num_steps=10000' --workdir=/tmp/dense_small

Rerunning with the same --workdir resumes from its latest checkpoint. Multi-process:
--coordinator_address=host:port --num_processes=N --process_id=i on each process, or
--multihost on TPU pods and SLURM clusters (jax detects the rest).
"""
import sys

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_multi_string("gin_file", [], "Gin files, parsed in order (later ones win).")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_bool("multihost", False, "Join a TPU pod / cluster run (jax auto-detection).")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from adacomp import gin_utils, sharding, training  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, auto=FLAGS.multihost)
  try:
    gin_utils.parse(FLAGS.gin_file, FLAGS.gin_bindings)
    summary = training.train(FLAGS.workdir)
  except (ValueError, PermissionError, FloatingPointError) as e:
    print(f"\nERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if "bits_per_byte" in summary:
    print(f"\nFinal validation: loss {summary['loss']:.4f} | bits/byte "
          f"{summary['bits_per_byte']:.4f} | perplexity {summary['perplexity']:.3f} | "
          f"token accuracy {summary['token_accuracy']:.4f}", flush=True)
  else:
    print(f"\nFinal validation: loss {summary['loss']:.4f} | top-1 {summary['accuracy']:.4f} | "
          f"compute fraction {summary['compute_fraction']:.3f}", flush=True)


if __name__ == "__main__":
  app.run(main)
