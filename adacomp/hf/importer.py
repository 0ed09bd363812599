"""Importing a Hugging Face language model directory into an adacomp workdir.

`import_lm(hf_dir, workdir)` reads config.json (the family and its DecoderConfig fields,
adacomp/hf/families.py), the safetensors weights (adacomp/hf/convert.py, one parameter at a
time, each placed on the gin-configured mesh as it is read) and the tokenizer, and writes:

  <workdir>/checkpoints/0/{params,meta}  an orbax checkpoint as training writes it (step 0)
  <workdir>/config.gin                   the DecoderConfig architecture and the tokenizer
  <workdir>/tokenizer/tokenizer.json     a copy of the HF tokenizer (and tokenizer_config.json)

so that `eval.py --checkpoint_dir=<workdir>`, `scripts/generate.py --checkpoint_dir=<workdir>`
and any method config with `--gin_file=<workdir>/config.gin` and
`train.init_checkpoint='<workdir>'` start from the pretrained weights. config.gin binds only
architecture fields and the tokenizer, so a method's own `DecoderConfig.ffn_cls` (DuoFFN,
RoutedFFN, ...) stays in force.
"""
import math
import os
import shutil
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adacomp import checkpointing, sharding
from adacomp.hf import convert, vision
from adacomp.hf.workdir import check_fresh_workdir, read_config, write_workdir
from adacomp.hf.families import ARCHITECTURE_FIELDS, Family, family_of
from adacomp.models.decoder import DecoderConfig, DecoderLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
NO_TOKENIZER = "none"


def gin_text(fields: dict, tokenizer_path: Optional[str], hf: dict) -> str:
  """config.gin: the architecture and the tokenizer, as bindings only."""
  lines = [f"# Imported from a Hugging Face {hf.get('architectures')} checkpoint by "
           f"scripts/import_hf.py."]
  lines += [f"DecoderConfig.{k} = {fields[k]!r}" for k in ARCHITECTURE_FIELDS]
  if tokenizer_path:
    lines += ["get_tokenizer.kind = 'hf'", f"get_tokenizer.hf_tokenizer_path = {tokenizer_path!r}"]
    for kind in ("bos", "eos", "pad"):
      value = hf.get(f"{kind}_token_id")
      if isinstance(value, int) and 0 <= value < fields["vocab_size"]:
        lines.append(f"get_tokenizer.{kind}_id = {value}")
  return "\n".join(lines) + "\n"


def _tokenizer_source(hf_dir: str, tokenizer: Optional[str]) -> Optional[str]:
  if tokenizer == NO_TOKENIZER:
    return None
  path = tokenizer or os.path.join(hf_dir, "tokenizer.json")
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No tokenizer.json at {path}: the import needs the model's Hugging Face tokenizer "
        f"(the `tokenizers` format; a SentencePiece tokenizer.model must be converted with "
        f"transformers' AutoTokenizer(...).save_pretrained first). Pass --tokenizer=PATH, or "
        f"--tokenizer={NO_TOKENIZER} to import the weights alone.")
  return path


def host_bytes_needed(abstract) -> int:
  """The host memory the import holds at once: the largest parameter in float32 (stacked
  over layers), read and converted before it is placed and freed."""
  return max(4 * math.prod(x.shape) for x in jax.tree.leaves(abstract))


def import_lm(hf_dir: str, workdir: str, tokenizer: Optional[str] = None, log=print) -> dict:
  """Writes the checkpoint, config.gin and tokenizer copy; returns the DecoderConfig fields."""
  hf = read_config(hf_dir)
  family: Family = family_of(hf, hf_dir)
  fields = family.model_config(hf)
  check_fresh_workdir(workdir)
  tokenizer_path = _tokenizer_source(hf_dir, tokenizer)
  reader = convert.SafetensorsReader(hf_dir, family)
  config = DecoderConfig(**fields)
  model = DecoderLM(config)
  mesh, rules = sharding.make_mesh(), sharding.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    boxed = boxed["params"]
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = sharding.strip_boxes(boxed)
    log(f"Importing {family.name} from {hf_dir}: {reader.total_bytes() / 1e6:,.3g} MB of "
        f"safetensors; host memory needed: about {host_bytes_needed(abstract) / 1e6:,.3g} MB "
        f"(the largest parameter in float32), each parameter placed on the "
        f"{dict(mesh.shape)} mesh as it is read.")

    def place(path, value):
      target = shardings
      for key in path:
        target = target[key]
      return jax.device_put(value, target)

    params = convert.to_params(reader, family, fields, abstract, place)
  checkpointing.ensure_writable(workdir)
  local_tokenizer = None
  if tokenizer_path:
    os.makedirs(os.path.join(workdir, "tokenizer"), exist_ok=True)
    for name in TOKENIZER_FILES:
      source = os.path.join(os.path.dirname(tokenizer_path), name)
      if name == "tokenizer.json":
        source = tokenizer_path
      if os.path.isfile(source):
        shutil.copy(source, os.path.join(workdir, "tokenizer", name))
    local_tokenizer = os.path.abspath(os.path.join(workdir, "tokenizer", "tokenizer.json"))
  text = gin_text(fields, local_tokenizer, hf)
  meta = {"gin_config": text, "batch_size": 8, "eval_batches": 4,
          "seq_len": min(128, fields["max_len"]), "vocab_size": fields["vocab_size"],
          "hf": {"family": family.name, "config": hf}}
  write_workdir(workdir, params, meta, text, log)
  log(f"Wrote {workdir}: checkpoint step 0 ({sum(x.size for x in jax.tree.leaves(params)):,} "
      f"parameters), config.gin{', tokenizer/' if tokenizer_path else ''}.")
  return fields


def decoder_fields(config: DecoderConfig) -> dict:
  """The architecture fields of a DecoderConfig, as families.py names them."""
  return {k: getattr(config, k) for k in ARCHITECTURE_FIELDS}


def import_model(hf_dir: str, workdir: str, tokenizer: Optional[str] = None, log=print):
  """scripts/import_hf.py: a language model (import_lm) or a ViT classifier (adacomp.hf.vision)."""
  hf = read_config(hf_dir)
  if vision.is_vision(hf):
    return vision.import_vit(hf_dir, workdir, log=log)
  return import_lm(hf_dir, workdir, tokenizer=tokenizer, log=log)


__all__ = ["import_model", "import_lm", "read_config", "check_fresh_workdir", "decoder_fields",
           "host_bytes_needed", "write_workdir"]
