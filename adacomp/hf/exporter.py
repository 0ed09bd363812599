"""Exporting an adacomp decoder back to a Hugging Face directory that transformers loads.

Only a model whose architecture is still a plain member of a family exports: the dense
backbone (DenseFFN, MultiHeadAttention) with DecoderConfig fields the family can express
(`families.check_exportable` names the first one that it cannot). A SkipDecode fine-tune exports
as that dense model: its weights are a plain decoder's, and the skip schedule is a decoding-time
policy of adacomp (scripts/generate.py --speedup) that transformers does not run, so
transformers computes every layer for every token. Duo, routed or TokenFormer FFNs/attention
are refused.

Writes config.json (the imported model's own config.json updated with the architecture, when
the checkpoint came from scripts/import_hf.py), model.safetensors and, for an HF tokenizer, its
tokenizer.json / tokenizer_config.json.
"""
import json
import os
import re
import shutil
from typing import Optional

import gin
from safetensors.numpy import save_file

from adacomp import checkpointing, gin_utils
from adacomp.hf import convert
from adacomp.hf.families import FAMILIES, check_exportable
from adacomp.hf.importer import TOKENIZER_FILES, decoder_fields
from adacomp.models import build
from layers.attention import MultiHeadAttention
from layers.mlp import DenseFFN


def _plain(cls, expected, slot: str) -> None:
  cls = getattr(cls, "func", cls)
  if cls is not expected:
    raise ValueError(
        f"DecoderConfig.{slot}={getattr(cls, '__name__', cls)}: only a dense backbone "
        f"({expected.__name__}) exports to Hugging Face, since transformers has no such layer. "
        f"Export the dense (or SkipDecode) checkpoint the method started from instead.")


# gin's operative config may wrap a long value onto the next line (a backslash, then the value).
_INIT = re.compile(r"^train\.init_checkpoint\s*=\s*(?:\\\s*)?'([^']+)'", re.MULTILINE)


def hf_origin(meta: dict, hops: int = 8) -> dict:
  """{'family', 'config'} of the imported checkpoint this run descends from, through the chain
  of `train.init_checkpoint`s in the saved configs (a fine-tune of a fine-tune of an import);
  {} when there is none."""
  for _ in range(hops):
    if meta.get("hf"):
      return meta["hf"]
    parent = _INIT.search(meta.get("gin_config", ""))
    if not parent:
      return {}
    try:
      meta = checkpointing.read_meta(parent.group(1))[1]
    except (checkpointing.CheckpointError, OSError):
      return {}
  return {}


def _bound_value(name: str):
  try:
    return gin.query_parameter(name)
  except ValueError:
    return None


def hf_config(family, fields: dict, template: Optional[dict]) -> dict:
  config = dict(template or {"model_type": family.name})
  config.update(family.hf_config(fields))
  config["architectures"] = list(family.architectures)
  if "rope_theta" in config:  # transformers >= 5 reads rope_parameters; older ones rope_theta
    params = dict(config.get("rope_parameters") or {"rope_type": "default"})
    params["rope_theta"] = config["rope_theta"]
    config["rope_parameters"] = params
  config["dtype"] = "float32"
  config.pop("torch_dtype", None)
  return config


def export_lm(checkpoint_dir: str, out_dir: str, family: Optional[str] = None, log=print) -> str:
  """Writes `out_dir`; returns the family name."""
  if os.path.exists(os.path.join(out_dir, "config.json")):
    raise ValueError(f"--out_dir={out_dir} already holds a model (config.json); pass a new "
                     f"directory.")
  step, meta = gin_utils.parse_checkpoint_config(checkpoint_dir)
  origin = hf_origin(meta)
  name = family or origin.get("family")
  if name not in FAMILIES:
    raise ValueError(f"{checkpoint_dir} was not imported from Hugging Face and --family="
                     f"{family} is not one of {sorted(FAMILIES)}; pass the family to export as.")
  fam = FAMILIES[name]
  model, params = build.load_decoder(checkpoint_dir, meta, step)
  _plain(model.config.ffn_cls, DenseFFN, "ffn_cls")
  _plain(model.config.attention_cls, MultiHeadAttention, "attention_cls")
  fields = decoder_fields(model.config)
  template = origin.get("config") if origin.get("family") == name else None
  check_exportable(fam, fields, template)
  tensors = convert.from_params(params, fam, fields)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config(fam, fields, template), f, indent=1)
  tokenizer = _bound_value("get_tokenizer.hf_tokenizer_path")
  if tokenizer:
    for file in TOKENIZER_FILES:
      source = os.path.join(os.path.dirname(tokenizer), file)
      if os.path.isfile(source):
        shutil.copy(source, os.path.join(out_dir, file))
  log(f"Wrote {out_dir}: {fam.architectures[0]} with {len(tensors)} tensors (step {step} of "
      f"{checkpoint_dir}); load it with transformers.AutoModelForCausalLM.from_pretrained.")
  return name
