"""Vision Transformer classifier (ViT / DeiT) with optional AS-ViT token pruning.

images [b, H, W, C] -> non-overlapping p x p patches -> linear embedding -> [CLS] + patches +
learned position embeddings -> L pre-norm encoder blocks (layers/encoder.py) -> LayerNorm ->
linear head on the class token (Dosovitskiy et al., 2021; Touvron et al., 2021).

With `ViTConfig.prune_after` set, a `layers.token_pruning.ThresholdPruner` after each listed
block (1-indexed) drops the image tokens whose AS-ViT score is under the stage's learned
threshold (Liu et al., arXiv 2209.13802). Three forward modes:

  * train=True: straight-through masks, masked softmax (every token still computed). Sown into
    `losses`: the budget term  budget_weight * |mean_b FLOPs(x_b) / FLOPs_dense - rho|  and,
    when distill_weight > 0, distill_weight * KL(p_teacher || p_student), where the teacher is
    this model's own dense forward pass (pruning off) under stop_gradient. So the teacher is the
    dense network being fine-tuned rather than a frozen copy of the starting checkpoint: one set
    of params, no second checkpoint to carry; it starts equal to the dense ViT checkpoint.
  * train=False, capacity=None: hard masks, exact per-image decisions, full-size compute. The
    sown MACs count kept tokens only, so evaluation reports the compute the pruned model needs.
  * train=False, capacity=(k_1, ...): after stage s only the class token and k_s image tokens
    per image are kept in the arrays (per-image top-k by score), so every later block really
    computes on 1 + k_s tokens; a static shape for the whole batch.

FLOPs in the budget are whole-model MACs per image (patch embedding, blocks, head), with the
straight-through masks so the term has a gradient: block MACs are
sum_j m_j (4 d H d_head + 2 d d_ff) + 2 H d_head (sum_j m_j)^2.
"""
import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from adacomp.models.decoder import parse_dtype
from layers.encoder import EncoderBlock
from layers.normalization import LayerNorm
from layers.token_pruning import ThresholdPruner, pack_top_k, validate_stages


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Everything that defines the ViT; configs/vit.gin and configs/as_vit.gin set it."""
  image_size: int = 32
  patch_size: int = 4
  channels: Optional[int] = None  # None: taken from the dataset by the trainer
  num_classes: Optional[int] = None  # None: taken from the dataset by the trainer
  num_layers: int = 6
  d_model: int = 64
  num_heads: int = 4
  head_dim: int = 16
  d_ff: int = 128
  activation: str = "gelu"
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  # AS-ViT pruning: stages after these blocks (1-indexed), one initial threshold per stage.
  prune_after: Sequence[int] = ()
  threshold_init: Sequence[float] = ()
  temperature: float = 1e-4
  budget_ratio: Optional[float] = None  # rho; None: no budget term
  budget_weight: float = 2.0
  distill_weight: float = 0.5

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def validate(self) -> None:
    if self.image_size % self.patch_size:
      raise ValueError(f"ViTConfig.image_size={self.image_size} is not a multiple of "
                       f"ViTConfig.patch_size={self.patch_size}; change one of them.")
    if self.channels is None or self.num_classes is None:
      raise ValueError("ViTConfig.channels and ViTConfig.num_classes must be set (the trainer "
                       "takes them from the dataset; set them when building a ViT by hand).")
    validate_stages(self.prune_after, self.threshold_init, self.num_layers)


def dense_macs_per_image(cfg: ViTConfig) -> float:
  """MACs of one image through the dense model: embedding, L blocks on N + 1 tokens, head."""
  n = cfg.num_patches + 1
  inner = cfg.num_heads * cfg.head_dim
  patch_dim = cfg.patch_size ** 2 * cfg.channels
  block = n * (4 * cfg.d_model * inner + 2 * cfg.d_model * cfg.d_ff) + 2 * inner * n * n
  return float(cfg.num_patches * patch_dim * cfg.d_model + cfg.num_layers * block +
               cfg.d_model * cfg.num_classes)


def patchify(images, patch_size: int):
  """[b, H, W, C] -> [b, (H/p)(W/p), p*p*C], patches in row-major order."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViT(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, images, *, train: bool = False,
               capacity: Optional[Sequence[int]] = None):
    """images: float [b, H, W, C]; returns float32 logits [b, num_classes] (module docstring)."""
    cfg = self.config
    cfg.validate()
    dtype, param_dtype = parse_dtype(cfg.dtype), parse_dtype(cfg.param_dtype)
    b, h, w, c = images.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.channels):
      raise ValueError(f"ViT got images of shape {(h, w, c)}, the config expects "
                       f"{(cfg.image_size, cfg.image_size, cfg.channels)}; set "
                       f"image_dataset.image_size / ViTConfig.image_size to match.")
    stages = tuple(cfg.prune_after)
    if capacity is not None and len(capacity) != len(stages):
      raise ValueError(f"capacity={tuple(capacity)} needs one token count per pruning stage "
                       f"(ViTConfig.prune_after={stages}).")
    n_img, d = cfg.num_patches, cfg.d_model
    inner = cfg.num_heads * cfg.head_dim
    patch_dim = cfg.patch_size ** 2 * c
    init = nn.initializers.lecun_normal()
    w_pe = self.param("patch_embed", nn.with_logical_partitioning(init, (None, "embed")),
                      (patch_dim, d), param_dtype)
    b_pe = self.param("patch_embed_bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("embed",)), (d,), param_dtype)
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, d), param_dtype)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, n_img + 1, d), param_dtype)
    w_head = self.param("head", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             ("embed", "vocab")),
                        (d, cfg.num_classes), param_dtype)
    b_head = self.param("head_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  ("vocab",)),
                        (cfg.num_classes,), param_dtype)
    x = patchify(images.astype(dtype), cfg.patch_size) @ w_pe.astype(dtype) + b_pe.astype(dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), x], axis=1)
    x = x + pos.astype(dtype)
    self.sow("intermediates", "macs", jnp.full((b, n_img), patch_dim * d, jnp.float32))

    blocks = [EncoderBlock(cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.activation, dtype=dtype,
                           param_dtype=param_dtype, name=f"block_{i}")
              for i in range(cfg.num_layers)]
    pruners = [ThresholdPruner(float(t), cfg.temperature, name=f"pruner_{k}")
               for k, t in enumerate(cfg.threshold_init)]
    final_norm = LayerNorm(use_scale=True, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                           name="final_norm")

    def forward(x, prune: bool):
      """Returns (logits, differentiable MACs per image [b], kept fraction per stage)."""
      mask = None
      cost = jnp.full((b,), n_img * patch_dim * d + d * cfg.num_classes, jnp.float32)
      kept = []
      for i, block in enumerate(blocks):
        x, cls_attn, value_norms = block(x, mask)
        m = jnp.ones(x.shape[:2], jnp.float32) if mask is None else mask
        count = jnp.sum(m, axis=-1)
        cost = cost + count * (4 * d * inner + 2 * d * cfg.d_ff) + 2 * inner * count * count
        if prune and i + 1 in stages:
          k = stages.index(i + 1)
          mask, scores = pruners[k](cls_attn, value_norms, m, train=train)
          if capacity is not None:
            x, mask, _ = pack_top_k(x, scores, mask, int(capacity[k]))
          kept.append(jnp.sum(mask[:, 1:], axis=-1) / n_img)
      logits = jnp.einsum("bd,dk->bk", final_norm(x[:, 0]), w_head.astype(dtype),
                          preferred_element_type=jnp.float32) + b_head.astype(jnp.float32)
      return logits, cost, kept

    logits, cost, kept = forward(x, prune=bool(stages))
    self.sow("intermediates", "macs", jnp.full((b, 1), d * cfg.num_classes, jnp.float32))
    for k, fraction in enumerate(kept):
      self.sow("intermediates", f"kept_stage{k}", fraction)
    if train and stages:
      dense = dense_macs_per_image(cfg)
      if cfg.budget_ratio is not None:
        self.sow("losses", "budget",
                 cfg.budget_weight * jnp.abs(jnp.mean(cost) / dense - cfg.budget_ratio))
      if cfg.distill_weight:
        teacher, _, _ = forward(x, prune=False)
        teacher = jax.lax.stop_gradient(teacher)
        kl = jnp.sum(jax.nn.softmax(teacher) * (jax.nn.log_softmax(teacher) -
                                                jax.nn.log_softmax(logits)), axis=-1)
        self.sow("losses", "distillation", cfg.distill_weight * jnp.mean(kl))
    return logits


def build_vit(channels: int, num_classes: int, config: Optional[ViTConfig] = None) -> ViT:
  """The gin-configured ViT, with the dataset's channels and classes unless the config fixes
  them (a mismatch is an error)."""
  config = ViTConfig() if config is None else config
  for field, value in (("channels", channels), ("num_classes", num_classes)):
    fixed = getattr(config, field)
    if fixed is None:
      config = dataclasses.replace(config, **{field: value})
    elif fixed != value:
      raise ValueError(f"ViTConfig.{field}={fixed} but the dataset has {value}; remove the "
                       f"binding or use a matching dataset.")
  return ViT(config)

