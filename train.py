r"""Trains an adacomp model from gin configs.

Required: --workdir (checkpoints, metrics and the operative config go there) and at least one
--gin_file. Configs live in configs/ and resolve from any directory:

  python train.py --gin_file=configs/dense.gin --workdir=/tmp/adacomp/dense
  python train.py --gin_file=configs/dense.gin --gin_file=configs/sizes/small.gin \
      --gin_bindings='train.num_steps = 10000' --workdir=/tmp/adacomp/dense_small
  python train.py --list_configs                        # every config in configs/
  python train.py --gin_file=configs/duo.gin --print_config   # its parameters, then exit

Rerunning with the same --workdir resumes from its latest checkpoint. Stage configs (routers,
fine-tunes) need the earlier stage's workdir: --gin_bindings="train.init_checkpoint='DIR'".
Multi-process: --coordinator_address=host:port --num_processes=N --process_id=i on each
process, or --multihost on TPU pods and SLURM clusters (jax detects the rest).
"""
from absl import flags

from adacomp import cli

flags.DEFINE_multi_string("gin_file", [], "Gin files, parsed in order (later ones win); "
                          "looked up in the current directory, --gin_search_paths and the "
                          "repository's configs/.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files.")
flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories for gin files and their "
                          "includes (configs/ is always searched).")
flags.DEFINE_string("workdir", None, "Required. Directory for checkpoints, metrics and the "
                    "config; an existing run there is resumed.")
flags.DEFINE_bool("list_configs", False, "Print the configs in configs/ and exit.")
flags.DEFINE_bool("print_config", False, "Parse --gin_file/--gin_bindings, print every bound "
                  "parameter and exit.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_bool("multihost", False, "Join a TPU pod / cluster run (jax detects the rest).")
FLAGS = flags.FLAGS


def main():
  from adacomp import gin_utils  # pylint: disable=g-import-not-at-top
  from adacomp.methods import registry  # pylint: disable=g-import-not-at-top,unused-import
  if FLAGS.list_configs:
    print("\n".join(gin_utils.available_configs()))
    return
  if not FLAGS.gin_file:
    raise ValueError("No --gin_file given. Start from configs/dense.gin (python train.py "
                     "--list_configs prints them all).")
  if FLAGS.print_config:
    import gin  # pylint: disable=g-import-not-at-top
    gin_utils.parse(FLAGS.gin_file, FLAGS.gin_bindings, finalize=False,
                    search=FLAGS.gin_search_paths)
    print(gin.config_str())
    return
  if not FLAGS.workdir:
    raise ValueError("--workdir is required: the directory for checkpoints, metrics and the "
                     "config (e.g. --workdir=/tmp/adacomp/dense).")
  from adacomp import sharding, training  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, auto=FLAGS.multihost)
  gin_utils.parse(FLAGS.gin_file, FLAGS.gin_bindings, search=FLAGS.gin_search_paths)
  summary = training.train(FLAGS.workdir)
  if "bits_per_byte" in summary:
    print(f"\nFinal validation: loss {summary['loss']:.4f} | bits/byte "
          f"{summary['bits_per_byte']:.4f} | perplexity {summary['perplexity']:.3f} | "
          f"token accuracy {summary['token_accuracy']:.4f}", flush=True)
  else:
    print(f"\nFinal validation: loss {summary['loss']:.4f} | top-1 {summary['accuracy']:.4f} | "
          f"compute fraction {summary['compute_fraction']:.3f}", flush=True)
  print(f"Checkpoints: {summary['checkpoint_dir']}\n"
        f"Evaluate:    python eval.py --checkpoint_dir={FLAGS.workdir}"
        f"  (whole split: add --eval_batches=all)", flush=True)


if __name__ == "__main__":
  cli.run(main)
