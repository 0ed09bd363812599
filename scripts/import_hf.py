r"""Imports a local Hugging Face checkpoint (safetensors, no torch) into an adacomp workdir.

  python scripts/import_hf.py --hf_dir=/models/Llama-3.2-1B --workdir=/tmp/adacomp/llama
  python eval.py --checkpoint_dir=/tmp/adacomp/llama
  python scripts/generate.py --checkpoint_dir=/tmp/adacomp/llama --prompts=docs/prompts.txt
  python train.py --gin_file=configs/informed_routing.gin --gin_file=/tmp/adacomp/llama/config.gin \
      --gin_bindings="train.init_checkpoint='/tmp/adacomp/llama'" --workdir=/tmp/adacomp/ir

Language models: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, GPT2LMHeadModel,
OPTForCausalLM; vision: ViTForImageClassification (docs/hf.md). The workdir must be new. Each
parameter is placed on the gin-configured mesh (`make_mesh`) as it is read.
"""
from absl import flags

from adacomp import cli

flags.DEFINE_string("hf_dir", None, "A Hugging Face model directory (config.json, safetensors).")
flags.DEFINE_string("workdir", None, "A new directory for the checkpoint and config.gin.")
flags.DEFINE_string("tokenizer", None, "tokenizer.json to use (default: the one in --hf_dir); "
                    "'none' imports the weights without a tokenizer.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. the mesh the parameters are "
                          "placed on: --gin_bindings='make_mesh.fsdp = 8'.")
flags.mark_flags_as_required(["hf_dir", "workdir"])
FLAGS = flags.FLAGS


def main():
  from adacomp import gin_utils  # pylint: disable=g-import-not-at-top
  from adacomp.hf import importer  # pylint: disable=g-import-not-at-top
  gin_utils.parse([], FLAGS.gin_bindings)
  importer.import_model(FLAGS.hf_dir, FLAGS.workdir, tokenizer=FLAGS.tokenizer)


if __name__ == "__main__":
  cli.run(main)
