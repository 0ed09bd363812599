"""The Hugging Face families adacomp imports: their config.json as DecoderConfig fields, and the
name and layout of every weight.

A family is a `Family`: `model_config(hf)` turns a config.json dict into DecoderConfig fields
(refusing, by name, every option that would change the function and that adacomp does not
compute), `hf_config(fields)` is the inverse used by the export, and `weights(fields)` lists
`Weight`s: one adacomp parameter (a path in the params tree; under "blocks" it is stacked over
layers) and the HF tensor(s) it comes from, with the layout change between them:

  'linear'  HF nn.Linear [out, in]   <-> adacomp [in, ...out] (a transpose, then heads split)
  'conv1d'  GPT-2's Conv1D [in, out] <-> adacomp [in, ...out] (heads split only)
  'copy'    the same values, reshaped (embeddings, norms, biases)
  'patch'   ViT's patch Conv2d [d, C, p, p] <-> adacomp's [p p C, d] (`shape`: the HF one)
  'fused'   GPT-2's c_attn: one [in, 3 out] tensor (or [3 out] bias) <-> adacomp's query, key,
            value (`path` then names the three).
"""
import dataclasses
from typing import Callable, Optional

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
# The DecoderConfig fields an imported model fixes; the rest (ffn_cls, scan_layers, dtype, ...)
# stay the method config's.
ARCHITECTURE_FIELDS = (
    "vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff", "max_len",
    "activation", "rope_base", "rope_fraction", "tied_embeddings", "norm", "final_norm",
    "norm_epsilon", "num_kv_heads", "attention_bias", "attention_out_bias", "attention_window",
    "rope_layout", "ffn_gated", "mlp_bias", "positions", "position_offset")


class UnsupportedConfigError(ValueError):
  """A config.json option adacomp does not compute (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Weight:
  path: tuple  # adacomp params path; ("blocks", ...) is stacked over layers
  hf: str  # HF tensor name; "{i}" stands for the layer index
  kind: str  # 'linear' | 'conv1d' | 'copy' | 'patch' | 'fused'
  paths: tuple = ()  # 'fused': the adacomp paths the HF tensor splits into
  shape: tuple = ()  # the HF tensor's shape where adacomp's does not imply it


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  architectures: tuple  # config.json "architectures" this family reads
  model_config: Callable[[dict], dict]
  hf_config: Callable[[dict], dict]
  weights: Callable[[dict], list]
  prefixes: tuple = ()  # name prefixes some saved checkpoints drop (GPT-2's "transformer.")
  ignored: tuple = ()  # HF tensors that are buffers, not weights (GPT-2's attn.bias mask)


def _refuse(hf: dict, option: str, why: str):
  raise UnsupportedConfigError(
      f"config.json sets {option}={hf.get(option)!r}, which adacomp does not compute ({why}); "
      f"remove the option from config.json only if the model was trained without it, or use a "
      f"checkpoint without it.")


def _activation(hf: dict, key: str) -> str:
  act = hf.get(key)
  if act not in ACTIVATIONS:
    _refuse(hf, key, f"supported activations: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[act]


def _rope_base(hf: dict) -> float:
  """rope_theta from `rope_parameters` (transformers >= 5) or the older `rope_theta`;
  any RoPE scaling (linear, dynamic, yarn, llama3, ...) is refused."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  rope_type = params.get("rope_type", "default")
  if rope_type != "default":
    _refuse(hf, "rope_parameters", f"rope_type {rope_type!r}: only the default RoPE is "
            f"implemented")
  if scaling:
    _refuse(hf, "rope_scaling", "only the default RoPE is implemented")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


# -- Llama, Qwen2, Mistral ---------------------------------------------------------------------
def _llama_like(kind: str):
  def model_config(hf: dict) -> dict:
    if kind == "qwen2" and hf.get("use_sliding_window"):
      _refuse(hf, "use_sliding_window", "Qwen2's per-layer sliding window (max_window_layers)")
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window") if kind == "mistral" else None
    bias = {"llama": hf.get("attention_bias", False), "qwen2": True, "mistral": False}[kind]
    return dict(
        vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"], num_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
        activation=_activation(hf, "hidden_act"), rope_base=_rope_base(hf),
        rope_fraction=float(hf.get("partial_rotary_factor", 1.0)),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)), norm="rms",
        final_norm=None, norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        num_kv_heads=hf.get("num_key_value_heads") or heads, attention_bias=bool(bias),
        attention_out_bias=bool(bias) and kind == "llama", attention_window=window,
        rope_layout="half", ffn_gated=True,
        mlp_bias=bool(hf.get("mlp_bias", False)) if kind == "llama" else False,
        positions="rope", position_offset=0)

  def hf_config(f: dict) -> dict:
    out = dict(
        vocab_size=f["vocab_size"], num_hidden_layers=f["num_layers"],
        hidden_size=f["d_model"], num_attention_heads=f["num_heads"], head_dim=f["head_dim"],
        intermediate_size=f["d_ff"], max_position_embeddings=f["max_len"],
        hidden_act=f["activation"] if f["activation"] != "gelu_tanh" else "gelu_pytorch_tanh",
        rope_theta=f["rope_base"], tie_word_embeddings=f["tied_embeddings"],
        rms_norm_eps=f["norm_epsilon"], num_key_value_heads=f["num_kv_heads"] or f["num_heads"])
    if f["rope_fraction"] != 1.0:
      out["partial_rotary_factor"] = f["rope_fraction"]
    if kind == "llama":
      out.update(attention_bias=f["attention_bias"], mlp_bias=f["mlp_bias"])
    if kind == "mistral":
      out["sliding_window"] = f["attention_window"]
    return out

  def weights(f: dict) -> list:
    a, m = ("blocks", "attn"), ("blocks", "ffn")
    ws = [Weight(("embed", "embedding"), "model.embed_tokens.weight", "copy"),
          Weight(("blocks", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight",
                 "copy"),
          Weight(("blocks", "ffn_norm", "scale"),
                 "model.layers.{i}.post_attention_layernorm.weight", "copy"),
          Weight(("final_norm", "scale"), "model.norm.weight", "copy")]
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                         ("out", "o_proj")):
      ws.append(Weight(a + (ours,), f"model.layers.{{i}}.self_attn.{theirs}.weight", "linear"))
      if (f["attention_bias"] and ours != "out") or (f["attention_out_bias"] and ours == "out"):
        ws.append(Weight(a + (ours + "_bias",), f"model.layers.{{i}}.self_attn.{theirs}.bias",
                         "copy"))
    for ours, theirs, bias in (("wi_gate", "gate_proj", "bi_gate"), ("wi", "up_proj", "bi"),
                               ("wo", "down_proj", "bo")):
      ws.append(Weight(m + (ours,), f"model.layers.{{i}}.mlp.{theirs}.weight", "linear"))
      if f["mlp_bias"]:
        ws.append(Weight(m + (bias,), f"model.layers.{{i}}.mlp.{theirs}.bias", "copy"))
    if not f["tied_embeddings"]:
      ws.append(Weight(("logits",), "lm_head.weight", "linear"))
    return ws

  return model_config, hf_config, weights


# -- GPT-2 -------------------------------------------------------------------------------------
def _gpt2_config(hf: dict) -> dict:
  if hf.get("scale_attn_weights") is False:
    _refuse(hf, "scale_attn_weights", "attention without the 1/sqrt(head_dim) scale")
  if hf.get("scale_attn_by_inverse_layer_idx"):
    _refuse(hf, "scale_attn_by_inverse_layer_idx", "a per-layer attention scale")
  if hf.get("add_cross_attention"):
    _refuse(hf, "add_cross_attention", "cross-attention to an encoder")
  d = hf["n_embd"]
  return dict(
      vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], d_model=d,
      num_heads=hf["n_head"], head_dim=d // hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
      max_len=hf["n_positions"], activation=_activation(hf, "activation_function"),
      rope_base=10000.0, rope_fraction=1.0,
      tied_embeddings=bool(hf.get("tie_word_embeddings", True)), norm="layernorm_affine",
      final_norm=None, norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
      num_kv_heads=hf["n_head"], attention_bias=True, attention_out_bias=True,
      attention_window=None, rope_layout="interleaved", ffn_gated=False, mlp_bias=True,
      positions="learned", position_offset=0)


def _gpt2_hf_config(f: dict) -> dict:
  act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[f["activation"]]
  return dict(vocab_size=f["vocab_size"], n_layer=f["num_layers"], n_embd=f["d_model"],
              n_head=f["num_heads"], n_inner=f["d_ff"], n_positions=f["max_len"],
              activation_function=act, tie_word_embeddings=f["tied_embeddings"],
              layer_norm_epsilon=f["norm_epsilon"])


def _gpt2_weights(f: dict) -> list:
  a, m, h = ("blocks", "attn"), ("blocks", "ffn"), "transformer.h.{i}."
  ws = [Weight(("embed", "embedding"), "transformer.wte.weight", "copy"),
        Weight(("pos_embed", "embedding"), "transformer.wpe.weight", "copy"),
        Weight(("final_norm", "scale"), "transformer.ln_f.weight", "copy"),
        Weight(("final_norm", "bias"), "transformer.ln_f.bias", "copy"),
        Weight((), h + "attn.c_attn.weight", "fused",
               paths=(a + ("query",), a + ("key",), a + ("value",))),
        Weight((), h + "attn.c_attn.bias", "fused",
               paths=(a + ("query_bias",), a + ("key_bias",), a + ("value_bias",))),
        Weight(a + ("out",), h + "attn.c_proj.weight", "conv1d"),
        Weight(a + ("out_bias",), h + "attn.c_proj.bias", "copy"),
        Weight(m + ("wi",), h + "mlp.c_fc.weight", "conv1d"),
        Weight(m + ("bi",), h + "mlp.c_fc.bias", "copy"),
        Weight(m + ("wo",), h + "mlp.c_proj.weight", "conv1d"),
        Weight(m + ("bo",), h + "mlp.c_proj.bias", "copy")]
  for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
    ws += [Weight(("blocks", ours, "scale"), h + theirs + ".weight", "copy"),
           Weight(("blocks", ours, "bias"), h + theirs + ".bias", "copy")]
  if not f["tied_embeddings"]:
    ws.append(Weight(("logits",), "lm_head.weight", "linear"))
  return ws


# -- OPT ---------------------------------------------------------------------------------------
def _opt_config(hf: dict) -> dict:
  d = hf["hidden_size"]
  if hf.get("do_layer_norm_before") is False:
    _refuse(hf, "do_layer_norm_before", "post-norm blocks (OPT-350m)")
  if hf.get("word_embed_proj_dim", d) != d:
    _refuse(hf, "word_embed_proj_dim", "embedding projections in and out (OPT-350m)")
  if hf.get("_remove_final_layer_norm"):
    _refuse(hf, "_remove_final_layer_norm", "a decoder without its final LayerNorm")
  if hf.get("layer_norm_elementwise_affine") is False:
    _refuse(hf, "layer_norm_elementwise_affine", "LayerNorm without scale and bias")
  if hf.get("enable_bias") is False:
    _refuse(hf, "enable_bias", "OPT without biases")
  heads = hf["num_attention_heads"]
  return dict(
      vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], d_model=d,
      num_heads=heads, head_dim=d // heads, d_ff=hf["ffn_dim"],
      max_len=hf["max_position_embeddings"], activation=_activation(hf, "activation_function"),
      rope_base=10000.0, rope_fraction=1.0,
      tied_embeddings=bool(hf.get("tie_word_embeddings", True)), norm="layernorm_affine",
      final_norm=None, norm_epsilon=1e-5, num_kv_heads=heads, attention_bias=True,
      attention_out_bias=True, attention_window=None, rope_layout="interleaved",
      ffn_gated=False, mlp_bias=True, positions="learned", position_offset=2)


def _opt_hf_config(f: dict) -> dict:
  return dict(vocab_size=f["vocab_size"], num_hidden_layers=f["num_layers"],
              hidden_size=f["d_model"], word_embed_proj_dim=f["d_model"],
              num_attention_heads=f["num_heads"], ffn_dim=f["d_ff"],
              max_position_embeddings=f["max_len"], activation_function=f["activation"],
              tie_word_embeddings=f["tied_embeddings"], do_layer_norm_before=True)


def _opt_weights(f: dict) -> list:
  a, m, h = ("blocks", "attn"), ("blocks", "ffn"), "model.decoder.layers.{i}."
  ws = [Weight(("embed", "embedding"), "model.decoder.embed_tokens.weight", "copy"),
        Weight(("pos_embed", "embedding"), "model.decoder.embed_positions.weight", "copy"),
        Weight(("final_norm", "scale"), "model.decoder.final_layer_norm.weight", "copy"),
        Weight(("final_norm", "bias"), "model.decoder.final_layer_norm.bias", "copy"),
        Weight(m + ("wi",), h + "fc1.weight", "linear"),
        Weight(m + ("bi",), h + "fc1.bias", "copy"),
        Weight(m + ("wo",), h + "fc2.weight", "linear"),
        Weight(m + ("bo",), h + "fc2.bias", "copy")]
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                       ("out", "out_proj")):
    ws += [Weight(a + (ours,), h + f"self_attn.{theirs}.weight", "linear"),
           Weight(a + (ours + "_bias",), h + f"self_attn.{theirs}.bias", "copy")]
  for ours, theirs in (("attn_norm", "self_attn_layer_norm"), ("ffn_norm", "final_layer_norm")):
    ws += [Weight(("blocks", ours, "scale"), h + theirs + ".weight", "copy"),
           Weight(("blocks", ours, "bias"), h + theirs + ".bias", "copy")]
  if not f["tied_embeddings"]:
    ws.append(Weight(("logits",), "lm_head.weight", "linear"))
  return ws


_ROPE_BUFFER = (".rotary_emb.inv_freq",)  # saved by older transformers; recomputed here
FAMILIES = {
    "llama": Family("llama", ("LlamaForCausalLM",), *_llama_like("llama"), ignored=_ROPE_BUFFER),
    "qwen2": Family("qwen2", ("Qwen2ForCausalLM",), *_llama_like("qwen2"), ignored=_ROPE_BUFFER),
    "mistral": Family("mistral", ("MistralForCausalLM",), *_llama_like("mistral"),
                      ignored=_ROPE_BUFFER),
    "gpt2": Family("gpt2", ("GPT2LMHeadModel",), _gpt2_config, _gpt2_hf_config, _gpt2_weights,
                   prefixes=("transformer.",), ignored=(".attn.bias", ".attn.masked_bias")),
    "opt": Family("opt", ("OPTForCausalLM",), _opt_config, _opt_hf_config, _opt_weights,
                  prefixes=("model.",)),
}
SUPPORTED_ARCHITECTURES = sorted(a for f in FAMILIES.values() for a in f.architectures) + [
    "ViTForImageClassification"]


def family_of(hf: dict, source: str) -> Family:
  """The family whose architecture config.json names; a clear error for any other."""
  names = hf.get("architectures") or []
  for family in FAMILIES.values():
    if any(n in family.architectures for n in names):
      return family
  raise UnsupportedConfigError(
      f"{source} is a {names or hf.get('model_type')!r} checkpoint; adacomp imports "
      f"{', '.join(SUPPORTED_ARCHITECTURES)}. Convert the model to one of these families, or "
      f"add the family to adacomp/hf/families.py.")


def check_exportable(family: Family, fields: dict, hf_template: Optional[dict] = None) -> None:
  """Raises ValueError naming the first DecoderConfig field that `family` cannot express."""
  template = dict(hf_template or {}, architectures=list(family.architectures))
  roundtrip = family.model_config({**template, **family.hf_config(fields)})
  for key in ARCHITECTURE_FIELDS:
    want = fields[key]
    got = roundtrip[key]
    if key == "num_kv_heads":
      want, got = want or fields["num_heads"], got or fields["num_heads"]
    if want != got:
      raise ValueError(
          f"DecoderConfig.{key}={want!r} has no {family.name} equivalent (the family has "
          f"{got!r}); only a model whose architecture is still a plain {family.name} exports.")

