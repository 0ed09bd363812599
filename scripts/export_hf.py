r"""Exports an adacomp decoder checkpoint to a Hugging Face directory (config.json, safetensors).

  python scripts/export_hf.py --checkpoint_dir=/tmp/adacomp/opt_skipdecode --out_dir=/tmp/opt_hf
  python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('/tmp/opt_hf')"

The model must still be a plain family member: the dense backbone, or a SkipDecode fine-tune
(exported as the dense model it is; transformers runs every layer). --family defaults to the
family the checkpoint was imported from (scripts/import_hf.py). See docs/hf.md.
"""
from absl import flags

from adacomp import cli

flags.DEFINE_string("checkpoint_dir", None, "A training --workdir or its checkpoints/ folder.")
flags.DEFINE_string("out_dir", None, "A new directory for the Hugging Face model.")
flags.DEFINE_string("family", None, "llama, qwen2, mistral, gpt2 or opt (default: the "
                    "family the checkpoint was imported from).")
flags.mark_flags_as_required(["checkpoint_dir", "out_dir"])
FLAGS = flags.FLAGS


def main():
  # pylint: disable=g-import-not-at-top,unused-import
  from adacomp.hf import exporter
  from adacomp.methods import registry
  exporter.export_lm(FLAGS.checkpoint_dir, FLAGS.out_dir, family=FLAGS.family)


if __name__ == "__main__":
  cli.run(main)
