r"""Grows a trained TokenFormer checkpoint by appending parameter tokens.

The logic lives in adacomp/methods/tokenformer/growth.py.

  python scripts/grow.py --source=/tmp/adacomp/tokenformer --target=/tmp/adacomp/tf_grown \
      --factor=2
  python train.py --gin_file=/tmp/adacomp/tf_grown/config.gin --workdir=/tmp/adacomp/tf_grown \
      --gin_bindings='train.num_steps=1200'

--select is a regular expression over Pattention module paths ('blocks/attn/query',
'blocks/attn/out', 'blocks/ffn/pattention'; default: all). The source is only read; the target
gets the grown checkpoint at the source's step, its config.gin and growth.json.
"""

from absl import flags

from adacomp import cli

flags.DEFINE_string("source", None, "Workdir (or its checkpoints/ folder) of a TokenFormer run.")
flags.DEFINE_string("target", None, "New workdir for the grown run (must not exist or be empty).")
flags.DEFINE_string("select", ".*", "Regex over Pattention module paths: which layers grow.")
flags.DEFINE_integer("add", None, "Parameter tokens appended to each chosen layer.")
flags.DEFINE_float("factor", None, "New token count = ceil(factor * old count).")
flags.DEFINE_enum("init", "zero_keys", ["zero_keys", "zero_values", "random"],
                  "New tokens: zero keys + random values (exact), zero values + random keys "
                  "(approximate), or both random (the released code; not function-preserving).")
flags.DEFINE_float("key_std", 0.02, "Std of new random keys (init zero_values / random).")
flags.DEFINE_integer("decay_steps", None, "make_optimizer.decay_steps of the grown run "
                     "(default: the source's, so the schedule continues unchanged).")
flags.DEFINE_integer("seed", 0, "Seed of the new tokens' random init.")
flags.mark_flags_as_required(["source", "target"])
FLAGS = flags.FLAGS


def main():
  from adacomp.methods import registry  # pylint: disable=g-import-not-at-top,unused-import
  from adacomp.methods.tokenformer import growth  # pylint: disable=g-import-not-at-top
  s = growth.grow_checkpoint(FLAGS.source, FLAGS.target, select=FLAGS.select, add=FLAGS.add,
                              factor=FLAGS.factor, init=FLAGS.init, key_std=FLAGS.key_std,
                              decay_steps=FLAGS.decay_steps, seed=FLAGS.seed)
  print(f"\n{'group':<6} {'tokens':>15} {'tau tokens':>11}  layers")
  for group, p in s["groups"].items():
    print(f"{group:<6} {p['old']:>6} -> {p['new']:<6} {p['tau_tokens']:>11}  "
          f"{', '.join(p['modules'])}")
  print(f"Parameters {s['params_before']:,} -> {s['params_after']:,} | step {s['step']} | "
        f"init {s['init']} | decay_steps {s['decay_steps']}\nWrote {s['target']}; resume with\n"
        f"  python train.py --gin_file={s['target']}/config.gin --workdir={s['target']} "
        f"--gin_bindings='train.num_steps=N'", flush=True)


if __name__ == "__main__":
  cli.run(main)
