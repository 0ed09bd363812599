"""Decoder-only Transformer language model, the backbone every language method shares.

ids -> Embed (+ learned positions) -> L x DecoderBlock (stacked with `nn.scan` or unrolled) ->
norm -> logits (tied to the embedding or a separate projection). Float32 parameters; the compute
dtype is `DecoderConfig.dtype` (bfloat16 on accelerators, as on TPU).

The options after `final_norm` describe the pretrained families adacomp imports
(adacomp/hf, docs/hf.md): Llama / Qwen2 / Mistral (SwiGLU, grouped-query attention, rotate-half
RoPE, biases on q/k/v for Qwen2, a sliding window for Mistral), GPT-2 and OPT (LayerNorm with
bias, biases everywhere, learned absolute positions; OPT's table is offset by 2). Their defaults
are adacomp's own backbone, so existing configs and checkpoints are unchanged.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from layers.attention import MultiHeadAttention
from layers.block import DecoderBlock
from layers.embedding import Embed
from layers.mlp import DenseFFN
from layers.normalization import make_norm

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name):
  if not isinstance(name, str):
    return name
  if name not in _DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; use one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Everything that defines the decoder; sizes come from configs/sizes/*.gin."""
  vocab_size: Optional[int] = None  # None: taken from the tokenizer by the trainer
  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  head_dim: int = 32
  d_ff: int = 512
  max_len: int = 1024
  activation: str = "gelu"
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  tied_embeddings: bool = True
  scan_layers: bool = True
  remat: bool = False
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  ffn_cls: Any = DenseFFN
  attention_cls: Any = MultiHeadAttention
  norm: str = "rms"  # or "layernorm" (non-parametric, TokenFormer)
  # The norm before the logits; None: `norm`. The released TokenFormer configs use a
  # non-parametric norm in the blocks and 'layernorm' (scale and bias) here: 'layernorm_affine'.
  final_norm: Optional[str] = None
  norm_epsilon: float = 1e-6
  num_kv_heads: Optional[int] = None  # None: num_heads; fewer: grouped-query attention
  attention_bias: bool = False  # biases on the q, k, v projections
  attention_out_bias: bool = False  # a bias on the output projection
  attention_window: Optional[int] = None  # sliding window: a token sees this many, itself too
  rope_layout: str = "interleaved"  # or "half" (rotate half: Llama, Qwen2, Mistral)
  ffn_gated: bool = False  # W_out (act(W_gate x) * W_in x): SwiGLU with activation 'silu'
  mlp_bias: bool = False
  positions: str = "rope"  # or "learned": an absolute position table, no RoPE (GPT-2, OPT)
  position_offset: int = 0  # rows of the learned table before position 0 (OPT: 2)
  # How a training step runs a layer mask (SkipDecode): 'masked' runs every layer on every
  # position and keeps the active outputs; 'prefix' runs layer l on the positions it is active
  # at only, when those are a prefix [0, p_l) (SkipDecode's non-increasing schedules): the
  # same values and gradients, p_l / t of the layer's compute (see `prefix_lengths`).
  layer_mask_compute: str = "masked"


POSITIONS = ("rope", "learned")
LAYER_MASK_COMPUTES = ("masked", "prefix")


def prefix_lengths(layer_mask) -> Optional[tuple]:
  """Per-layer p_l when `layer_mask` is a static bool [num_layers, t] whose layer l is active
  exactly at positions [0, p_l); None otherwise (traced, per-example, or not prefixes).

  SkipDecode's masks are such: positions' active-layer counts never increase, so a layer that
  runs at position t runs at every earlier one. Attention is causal, so the layer's outputs
  on the prefix need nothing beyond it: running the layer on x[:, :p_l] is exact."""
  if not isinstance(layer_mask, np.ndarray) or layer_mask.ndim != 2:
    return None
  lengths = layer_mask.sum(axis=1)
  if not all(layer_mask[i, :n].all() for i, n in enumerate(lengths)):
    return None
  return tuple(int(n) for n in lengths)


def final_norm_kind(cfg: DecoderConfig) -> str:
  """The final norm's kind: `final_norm`, or the blocks' `norm` when unset."""
  return cfg.norm if cfg.final_norm is None else cfg.final_norm


def block_kwargs(cfg: DecoderConfig, decode: bool = False) -> dict:
  """DecoderBlock's attributes from the config (shared by DecoderLM and adacomp.decoding)."""
  if cfg.positions not in POSITIONS:
    raise ValueError(f"DecoderConfig.positions={cfg.positions!r}; use one of {POSITIONS}.")
  return dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim, d_ff=cfg.d_ff,
              activation=cfg.activation, rope_base=cfg.rope_base,
              rope_fraction=cfg.rope_fraction if cfg.positions == "rope" else 0.0,
              ffn_cls=cfg.ffn_cls, attention_cls=cfg.attention_cls, norm=cfg.norm,
              norm_epsilon=cfg.norm_epsilon, num_kv_heads=cfg.num_kv_heads,
              qkv_bias=cfg.attention_bias, out_bias=cfg.attention_out_bias,
              rope_layout=cfg.rope_layout, window=cfg.attention_window,
              ffn_gated=cfg.ffn_gated, mlp_bias=cfg.mlp_bias, decode=decode,
              dtype=parse_dtype(cfg.dtype), param_dtype=parse_dtype(cfg.param_dtype))


def position_embed(cfg: DecoderConfig, dtype, param_dtype) -> Optional[Embed]:
  """The learned absolute position table ([max_len + position_offset, d_model]), or None."""
  if cfg.positions != "learned":
    return None
  return Embed(cfg.max_len + cfg.position_offset, cfg.d_model, dtype=dtype,
               param_dtype=param_dtype, embedding_init=nn.initializers.normal(stddev=0.02),
               name="pos_embed")


class DecoderLM(nn.Module):
  config: DecoderConfig
  decode: bool = False

  @nn.compact
  def __call__(self, ids, positions=None, layer_mask=None, routes=None):
    """ids: [b, t] int; returns float32 logits [b, t, vocab].

    layer_mask: optional bool [num_layers, t] or [num_layers, b, t]; where False the layer is
    the identity for that token (SkipDecode training, layer-skipping ablations).
    routes: optional int [num_layers, b, t] routing decisions imposed on every layer's FFN
    (oracles, ablations); None lets adaptive FFNs decide.
    """
    cfg = self.config
    dtype, param_dtype = parse_dtype(cfg.dtype), parse_dtype(cfg.param_dtype)
    b, t = ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                  embedding_init=nn.initializers.normal(stddev=cfg.d_model ** -0.5),
                  name="embed")
    x = embed(ids)
    pos_embed = position_embed(cfg, dtype, param_dtype)
    if pos_embed is not None:
      x = x + pos_embed(positions + cfg.position_offset)
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

    block_kw = block_kwargs(cfg, self.decode)
    block_cls = nn.remat(DecoderBlock) if cfg.remat else DecoderBlock
    if cfg.layer_mask_compute not in LAYER_MASK_COMPUTES:
      raise ValueError(f"DecoderConfig.layer_mask_compute={cfg.layer_mask_compute!r}; use one "
                       f"of {LAYER_MASK_COMPUTES}.")
    lengths = prefix_lengths(layer_mask) if cfg.layer_mask_compute == "prefix" else None
    if (lengths is not None and not self.decode and not self.is_initializing()
        and not self.is_mutable_collection("intermediates")):
      # A training step (no intermediates collected): each layer on its active prefix only.
      x = self._prefix_layers(block_cls, block_kw, x, positions, lengths, routes)
    elif cfg.scan_layers:
      # The layer index is scanned too: blocks are otherwise identical, and an FFN that seeds
      # its own random routes (DuoFFN at evaluation) must not give every layer the same ones.
      x, _ = nn.scan(
          lambda module, carry, pos, active, route, layer: (
              module(carry, pos, active, route, layer), None),
          variable_axes={"params": 0, "cache": 0, "intermediates": 0, "losses": 0},
          split_rngs={"params": True, "dropout": True, "routing": True},
          in_axes=(nn.broadcast, nn.broadcast if layer_mask is None else 0,
                   nn.broadcast if routes is None else 0, 0),
          length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
      )(block_cls(name="blocks", **block_kw), x, positions, layer_mask, routes,
        jnp.arange(cfg.num_layers, dtype=jnp.int32))
    else:
      for i in range(cfg.num_layers):
        active = None if layer_mask is None else layer_mask[i]
        route = None if routes is None else routes[i]
        x = block_cls(name=f"block_{i}", **block_kw)(x, positions, active, route, i)

    x = make_norm(final_norm_kind(cfg), dtype=dtype, param_dtype=param_dtype,
                  epsilon=cfg.norm_epsilon, name="final_norm")(x)
    if cfg.tied_embeddings:
      logits = embed.attend(x)
    else:
      w = self.param("logits", nn.with_logical_partitioning(
          nn.initializers.normal(stddev=cfg.d_model ** -0.5), ("embed", "vocab")),
                     (cfg.d_model, cfg.vocab_size), param_dtype)
      logits = jnp.einsum("btd,dv->btv", x, w.astype(dtype), preferred_element_type=jnp.float32)
    self.sow("intermediates", "macs", jnp.full((b, t), cfg.d_model * cfg.vocab_size, jnp.float32))
    return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))

  def _prefix_layers(self, block_cls, block_kw, x, positions, lengths, routes):
    """Layer i applied to x[:, :lengths[i]] with its own parameters (sliced from the scanned
    stack, or block_i's), the rest of x passed through; its sown losses re-sown here. Random
    streams are per layer (fold_in of the layer index), drawn over the prefix's shape."""
    cfg = self.config
    block = block_cls(parent=None, **block_kw)
    params = self.variables["params"]
    for i, n in enumerate(lengths):
      if n == 0:
        continue
      p = (jax.tree.map(lambda w, i=i: w[i], params["blocks"]) if cfg.scan_layers
           else params[f"block_{i}"])
      rngs = {name: jax.random.fold_in(self.make_rng(name), i)
              for name in ("dropout", "routing") if self.has_rng(name)}
      route = None if routes is None else routes[i][:, :n]
      y, mut = block.apply({"params": p}, x[:, :n], positions[:, :n], None, route,
                           jnp.int32(i), rngs=rngs, mutable=["losses"])
      for j, leaf in enumerate(jax.tree.leaves(mut.get("losses", {}))):
        self.sow("losses", f"layer_{i}_{j}", jnp.sum(leaf))
      x = jnp.concatenate([y, x[:, n:]], axis=1) if n < x.shape[1] else y
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
