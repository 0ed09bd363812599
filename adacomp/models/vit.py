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
  * `batch_k_apply`: the released code's batched inference, k_s = floor(total kept at stage s
    in the batch / B) per batch, run stage by stage (the host reads each k, as the released
    code's `.item()` does) with the arrays padded to k rounded up to a multiple of 8, so each
    stage compiles at most ceil(tokens / 8) shapes.

FLOPs in the budget are MACs per image with the straight-through masks, so the term has a
gradient: block MACs are sum_j m_j (4 d H d_head + 2 d d_ff) + 2 H d_head (sum_j m_j)^2.
`budget_form` picks the term:
  * 'normalised' (default): budget_weight * |mean_b F_b / F_dense - rho|, F whole-model MACs
    (patch embedding, blocks on kept tokens + the class token, head), F_dense the same count
    for the dense model.
  * 'gflops' (the released losses.py): budget_weight * |mean_b F'_b - rho F'_T| in GMACs (the
    released code calls them GFLOPs), counted as the released vit.py counts them: F' = patch
    embedding + blocks on the kept tokens and the class token, no head; the teacher's F'_T =
    patch embedding + blocks on the N image tokens only (`cal_flops` leaves the class token
    out). Since |mean F' - rho F'_T| = F'_T |mean F' / F'_T - rho|, weight w here acts as weight
    w * F'_T (F'_T in GMACs) on the normalised form, up to the counting differences (no head;
    the teacher without its class token): at DeiT-S F'_T = 4.6, so the released weight 2.0 is
    the normalised form's 9.2; for the tiny digits ViT F'_T = 0.016, so the released weight
    is ~60 times weaker than the normalised one there.
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
from layers.token_pruning import (ThresholdPruner, bucket_capacity, pack_batch_k, pack_top_k,
                                  validate_stages)

BUDGET_FORMS = ("normalised", "gflops")


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
  norm_epsilon: float = 1e-6  # LayerNorm's; Hugging Face ViT/DeiT checkpoints use 1e-12
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  # AS-ViT pruning: stages after these blocks (1-indexed), one initial threshold per stage.
  prune_after: Sequence[int] = ()
  threshold_init: Sequence[float] = ()
  temperature: float = 1e-4
  budget_ratio: Optional[float] = None  # rho; None: no budget term
  budget_weight: float = 2.0
  budget_form: str = "normalised"  # or "gflops", the released form (module docstring)
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
    if self.budget_form not in BUDGET_FORMS:
      raise ValueError(f"ViTConfig.budget_form={self.budget_form!r}; use one of {BUDGET_FORMS}.")


def dense_macs_per_image(cfg: ViTConfig) -> float:
  """MACs of one image through the dense model: embedding, L blocks on N + 1 tokens, head."""
  n = cfg.num_patches + 1
  inner = cfg.num_heads * cfg.head_dim
  patch_dim = cfg.patch_size ** 2 * cfg.channels
  block = n * (4 * cfg.d_model * inner + 2 * cfg.d_model * cfg.d_ff) + 2 * inner * n * n
  return float(cfg.num_patches * patch_dim * cfg.d_model + cfg.num_layers * block +
               cfg.d_model * cfg.num_classes)


def block_macs(cfg: ViTConfig, tokens):
  """MACs of one encoder block on `tokens` tokens (the released `Block.flops` when H d_head =
  d): 4 d H d_head n + 2 d d_ff n + 2 H d_head n^2."""
  inner = cfg.num_heads * cfg.head_dim
  return tokens * (4 * cfg.d_model * inner + 2 * cfg.d_model * cfg.d_ff) + 2 * inner * tokens ** 2


def released_teacher_gmacs(cfg: ViTConfig) -> float:
  """F'_T of the 'gflops' budget form, in GMACs: the released `cal_flops`, patch embedding +
  every block on the N image tokens (no class token, no head)."""
  patch_dim = cfg.patch_size ** 2 * cfg.channels
  return (cfg.num_patches * patch_dim * cfg.d_model +
          cfg.num_layers * block_macs(cfg, cfg.num_patches)) / 1e9


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
               capacity: Optional[Sequence[int]] = None, stop_at_stage: Optional[int] = None,
               resume: Optional[tuple] = None):
    """images: float [b, H, W, C]; returns float32 logits [b, num_classes] (module docstring).

    `stop_at_stage` / `resume` split the inference pass at pruning stages for
    `batch_k_apply`: stop_at_stage=s returns (x, present, keep, scores) at stage s, before its
    packing; resume=(s, k, capacity, x, present, scores) packs that state by the released
    batched rule (`pack_batch_k`) and runs on (images is then ignored; pass None).
    """
    cfg = self.config
    cfg.validate()
    dtype, param_dtype = parse_dtype(cfg.dtype), parse_dtype(cfg.param_dtype)
    if resume is not None:
      b, c = resume[3].shape[0], cfg.channels
    else:
      b, h, w, c = images.shape
    if resume is None and (h, w, c) != (cfg.image_size, cfg.image_size, cfg.channels):
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
    if resume is None:
      x = (patchify(images.astype(dtype), cfg.patch_size) @ w_pe.astype(dtype) +
           b_pe.astype(dtype))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), x], axis=1)
      x = x + pos.astype(dtype)
      self.sow("intermediates", "macs", jnp.full((b, n_img), patch_dim * d, jnp.float32))

    blocks = [EncoderBlock(cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.activation, dtype=dtype,
                           param_dtype=param_dtype, norm_epsilon=cfg.norm_epsilon,
                           name=f"block_{i}")
              for i in range(cfg.num_layers)]
    pruners = [ThresholdPruner(float(t), cfg.temperature, name=f"pruner_{k}")
               for k, t in enumerate(cfg.threshold_init)]
    final_norm = LayerNorm(use_scale=True, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                           epsilon=cfg.norm_epsilon, name="final_norm")

    def forward(x, prune: bool, mask=None, first_block=0):
      """Returns (logits, differentiable MACs per image [b] without the head, kept fraction
      per stage), or the state at stage `stop_at_stage`."""
      cost = jnp.full((b,), n_img * patch_dim * d, jnp.float32)
      kept = []
      for i, block in enumerate(blocks[first_block:], start=first_block):
        x, cls_attn, out_norms = block(x, mask)
        m = jnp.ones(x.shape[:2], jnp.float32) if mask is None else mask
        count = jnp.sum(m, axis=-1)
        cost = cost + count * (4 * d * inner + 2 * d * cfg.d_ff) + 2 * inner * count * count
        if prune and i + 1 in stages:
          k = stages.index(i + 1)
          mask, scores = pruners[k](cls_attn, out_norms, m, train=train)
          if stop_at_stage == k:
            return x, m, mask, scores
          if capacity is not None:
            x, mask, _ = pack_top_k(x, scores, mask, int(capacity[k]))
          kept.append(jnp.sum(mask[:, 1:], axis=-1) / n_img)
      logits = jnp.einsum("bd,dk->bk", final_norm(x[:, 0]), w_head.astype(dtype),
                          preferred_element_type=jnp.float32) + b_head.astype(jnp.float32)
      return logits, cost, kept

    if resume is not None:
      stage, k, cap, x, present, scores = resume
      x, mask = pack_batch_k(x, scores, present, k, int(cap))
      # The blocks before the stage ran in an earlier call; here their parameters go unused.
      return forward(x, True, mask, first_block=stages[stage])
    out = forward(x, prune=bool(stages))
    if stop_at_stage is not None:
      return out
    logits, cost, kept = out
    self.sow("intermediates", "macs", jnp.full((b, 1), d * cfg.num_classes, jnp.float32))
    for k, fraction in enumerate(kept):
      self.sow("intermediates", f"kept_stage{k}", fraction)
    if train and stages:
      if cfg.budget_ratio is not None and cfg.budget_form == "gflops":
        self.sow("losses", "budget", cfg.budget_weight * jnp.abs(
            jnp.mean(cost) / 1e9 - cfg.budget_ratio * released_teacher_gmacs(cfg)))
      elif cfg.budget_ratio is not None:
        fraction = (jnp.mean(cost) + d * cfg.num_classes) / dense_macs_per_image(cfg)
        self.sow("losses", "budget", cfg.budget_weight * jnp.abs(fraction - cfg.budget_ratio))
      if cfg.distill_weight:
        teacher, _, _ = forward(x, prune=False)
        teacher = jax.lax.stop_gradient(teacher)
        kl = jnp.sum(jax.nn.softmax(teacher) * (jax.nn.log_softmax(teacher) -
                                                jax.nn.log_softmax(logits)), axis=-1)
        self.sow("losses", "distillation", cfg.distill_weight * jnp.mean(kl))
    return logits


def batch_k_apply(model: ViT, params, images, weights=None, multiple: int = 8):
  """Logits [b, classes] by the released batched inference, and the k per stage.

  At each stage s, k_s = floor(tokens kept by the thresholds, summed over the batch's images
  (those with weight > 0 when `weights` is given, so padding does not count) / their number);
  every image then keeps its k_s highest-scored tokens (`pack_batch_k`), padded to
  `bucket_capacity(k_s)`. One jitted function per (stage, input length, capacity), cached.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  stages = len(model.config.prune_after)
  if not stages:
    return _jitted(model, None)(params, images), ()
  real = (np.ones(images.shape[0], bool) if weights is None else np.asarray(weights) > 0)
  count = max(int(real.sum()), 1)
  x, present, keep, scores = _jitted(model, ("stop", 0))(params, images)
  ks = []
  for s in range(stages):
    kept = np.asarray(keep)[real, 1:].sum()
    k = int(kept) // count
    cap = bucket_capacity(k, x.shape[1] - 1, multiple)
    ks.append(k)
    state = (x, present, scores)
    key = ("resume", s, cap) + (("stop", s + 1) if s + 1 < stages else ())
    out = _jitted(model, key)(params, jnp.int32(k), *state)
    if s + 1 < stages:
      x, present, keep, scores = out
    else:
      logits = out[0]
  return logits, tuple(ks)


_JIT_CACHE = {}


def _jitted(model: ViT, key):
  """The jitted segment `key` of `model`'s inference pass (see batch_k_apply)."""
  model = ViT(model.config)
  if (model.config, key) not in _JIT_CACHE:
    if key is None:
      fn = lambda p, x: model.apply({"params": p}, x)
    elif key[0] == "stop":
      fn = lambda p, x: model.apply({"params": p}, x, stop_at_stage=key[1])
    else:
      stop = key[4] if len(key) > 3 else None
      fn = lambda p, k, x, present, scores: model.apply(
          {"params": p}, None, stop_at_stage=stop, resume=(key[1], k, key[2], x, present, scores))
    _JIT_CACHE[(model.config, key)] = jax.jit(fn)
  return _JIT_CACHE[(model.config, key)]


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

