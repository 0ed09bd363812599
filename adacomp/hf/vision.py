"""Hugging Face ViTForImageClassification checkpoints into adacomp's ViT (adacomp/models/vit.py).

The mapping: the patch Conv2d becomes `patch_embed` (patchify's (row, column, channel) order),
class token and position table as they are, each encoder layer's q/k/v/output projections,
LayerNorms and MLP into `block_<i>`, the final LayerNorm and the classifier into `final_norm`
and `head`. DeiT checkpoints without distillation (facebook/deit-*-patch16-224) are saved as
ViTForImageClassification and import as such; the distilled ones (DeiTForImageClassification*,
with a distillation token and a second head) are refused: adacomp's ViT has one class token.
The workdir is written like a language model's (adacomp/hf/importer.py), with `ViTConfig`
bindings in config.gin, so `configs/as_vit.gin` fine-tunes it with
`train.init_checkpoint=<workdir>`.
"""
import jax
import jax.numpy as jnp

from adacomp import checkpointing, sharding
from adacomp.hf import convert
from adacomp.hf import workdir as workdir_files
from adacomp.hf.families import ACTIVATIONS, Family, UnsupportedConfigError, Weight
from adacomp.models.vit import ViT, ViTConfig

VISION_ARCHITECTURES = ("ViTForImageClassification",)
DEIT_ARCHITECTURES = ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")
VIT_FIELDS = ("image_size", "patch_size", "channels", "num_classes", "num_layers", "d_model",
              "num_heads", "head_dim", "d_ff", "activation", "norm_epsilon")


def is_vision(hf: dict) -> bool:
  names = set(hf.get("architectures") or [])
  return bool(names & set(VISION_ARCHITECTURES + DEIT_ARCHITECTURES))


def vit_config(hf: dict) -> dict:
  names = set(hf.get("architectures") or [])
  if names & set(DEIT_ARCHITECTURES):
    raise UnsupportedConfigError(
        f"{sorted(names)}: a distilled DeiT (a distillation token and a second head) is not "
        f"supported, since adacomp's ViT has one class token. Use a DeiT without distillation "
        f"(e.g. facebook/deit-small-patch16-224, saved as ViTForImageClassification).")
  if hf.get("qkv_bias") is False:
    raise UnsupportedConfigError("config.json sets qkv_bias=False; adacomp's ViT always has q/k/v "
                                 "biases. Use a checkpoint with them.")
  act = hf.get("hidden_act", "gelu")
  if act not in ACTIVATIONS:
    raise UnsupportedConfigError(f"config.json sets hidden_act={act!r}; supported: "
                                 f"{sorted(ACTIVATIONS)}.")
  heads = hf["num_attention_heads"]
  return dict(image_size=hf["image_size"], patch_size=hf["patch_size"],
              channels=hf.get("num_channels", 3),
              num_classes=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
              num_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"], num_heads=heads,
              head_dim=hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
              activation=ACTIVATIONS[act], norm_epsilon=float(hf.get("layer_norm_eps", 1e-12)))


def vit_weights(f: dict) -> list:
  p, d = f["patch_size"], f["d_model"]
  e = "vit.embeddings."
  ws = [Weight(("patch_embed",), e + "patch_embeddings.projection.weight", "patch",
               shape=(d, f["channels"], p, p)),
        Weight(("patch_embed_bias",), e + "patch_embeddings.projection.bias", "copy"),
        Weight(("cls_token",), e + "cls_token", "copy", shape=(1, 1, d)),
        Weight(("pos_embed",), e + "position_embeddings", "copy",
               shape=(1, (f["image_size"] // p) ** 2 + 1, d)),
        Weight(("final_norm", "scale"), "vit.layernorm.weight", "copy"),
        Weight(("final_norm", "bias"), "vit.layernorm.bias", "copy"),
        Weight(("head",), "classifier.weight", "linear"),
        Weight(("head_bias",), "classifier.bias", "copy")]
  for i in range(f["num_layers"]):
    blk, h = f"block_{i}", f"vit.encoder.layer.{i}."
    for ours in ("query", "key", "value"):
      ws += [Weight((blk, "attn", ours), h + f"attention.attention.{ours}.weight", "linear"),
             Weight((blk, "attn", ours + "_bias"), h + f"attention.attention.{ours}.bias", "copy")]
    ws += [Weight((blk, "attn", "out"), h + "attention.output.dense.weight", "linear"),
           Weight((blk, "attn", "out_bias"), h + "attention.output.dense.bias", "copy"),
           Weight((blk, "wi"), h + "intermediate.dense.weight", "linear"),
           Weight((blk, "bi"), h + "intermediate.dense.bias", "copy"),
           Weight((blk, "wo"), h + "output.dense.weight", "linear"),
           Weight((blk, "bo"), h + "output.dense.bias", "copy")]
    for ours, theirs in (("attn_norm", "layernorm_before"), ("mlp_norm", "layernorm_after")):
      ws += [Weight((blk, ours, "scale"), h + theirs + ".weight", "copy"),
             Weight((blk, ours, "bias"), h + theirs + ".bias", "copy")]
  return ws


VIT = Family("vit", VISION_ARCHITECTURES, vit_config, None, vit_weights, prefixes=("vit.",))


def gin_text(fields: dict) -> str:
  return "\n".join(["# Imported from a Hugging Face ViTForImageClassification checkpoint by "
                    "scripts/import_hf.py."] +
                   [f"ViTConfig.{k} = {fields[k]!r}" for k in VIT_FIELDS]) + "\n"


def import_vit(hf_dir: str, workdir: str, log=print) -> dict:
  """Writes <workdir>/checkpoints/0 and config.gin; returns the ViTConfig fields."""
  hf = workdir_files.read_config(hf_dir)
  fields = vit_config(hf)
  workdir_files.check_fresh_workdir(workdir)
  reader = convert.SafetensorsReader(hf_dir, VIT)
  model = ViT(ViTConfig(**fields))
  images = jnp.zeros((1, fields["image_size"], fields["image_size"], fields["channels"]))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]
  abstract = sharding.strip_boxes(abstract)
  log(f"Importing a ViT from {hf_dir}: {reader.total_bytes() / 1e6:,.3g} MB of safetensors.")
  params = convert.to_params(reader, VIT, fields, abstract, lambda path, v: jax.device_put(v))
  text = gin_text(fields)
  meta = {"gin_config": text, "batch_size": 64, "eval_batches": None,
          "task": "image_classification", "num_classes": fields["num_classes"],
          "channels": fields["channels"], "hf": {"family": "vit", "config": hf}}
  checkpointing.ensure_writable(workdir)
  workdir_files.write_workdir(workdir, params, meta, text, log)
  log(f"Wrote {workdir}: checkpoint step 0, config.gin.")
  return fields
