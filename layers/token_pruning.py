"""Adaptive Sparse ViT token pruning: class-attention scores against learned thresholds.

AS-ViT (Liu et al., "Adaptive Sparse ViT: Towards Learnable Adaptive Token Pruning by Fully
Exploiting Self-Attention", arXiv 2209.13802) scores every image token j after a pruning block
by the class token's attention, weighting each head by its share of the token's value norm:

    s_j = sum_h A_h[cls, j] * ||v_h[j]|| / sum_h' ||v_h'[j]||

and keeps the tokens whose score exceeds the stage's learned threshold theta (one scalar per
pruning stage). The class token is never dropped, and a token dropped at one stage stays dropped
at every later one (its mask multiplies into the next stage's).

Choices the paper leaves open, made here:
  * O_h[j] is read as token j's value vector in head h, the quantity through which j reaches
    every other token in that head (encoder.EncoderAttention returns these norms).
  * Training uses a straight-through mask: forward value 1[s > theta] (so training runs the
    exact inference model), gradient that of sigmoid((s - theta) / temperature), temperature
    1e-4 as in the paper. Masked softmax then keeps dropped tokens out of attention.
  * Inference has two forms. `mask` form (hard 0/1 mask, every token still computed) gives the
    exact per-image decisions, used for accuracy and compute accounting. `pack` form gathers
    per image the top-k tokens by score into a smaller array (k a static capacity, the same for
    the whole batch: the paper's k = floor(total kept / B)); of those, the ones under the
    threshold stay masked, so packing equals the mask form for every image with at most k
    tokens above threshold and drops the lowest-scored surplus tokens of the others.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def token_scores(cls_attn, value_norms):
  """s [b, n] from class-attention probabilities and value norms, both [b, h, n]."""
  share = value_norms / jnp.maximum(jnp.sum(value_norms, axis=1, keepdims=True), 1e-12)
  return jnp.sum(cls_attn * share, axis=1)


def threshold_mask(scores, threshold, prev_mask, *, train: bool, temperature: float = 1e-4):
  """Keep mask [b, n]: 1[s > theta] * prev_mask, class token (index 0) forced to 1.

  train=True: straight-through, value as above, gradient of sigmoid((s - theta) / temperature)
  with respect to both s and theta (and of prev_mask, so earlier stages learn from later ones).
  """
  hard = (scores > threshold).astype(jnp.float32)
  if train:
    soft = jax.nn.sigmoid((scores - threshold) / temperature)
    # Straight-through: the forward pass uses the hard 0/1 mask, the backward pass the sigmoid's
    # gradient, so the thresholds learn although the mask itself is a step function.
    keep = soft + jax.lax.stop_gradient(hard - soft)
  else:
    keep = hard
  keep = keep * prev_mask
  return keep.at[:, 0].set(1.0)


def pack_top_k(x, scores, mask, k: int):
  """Gathers the class token and the top-`k` image tokens by score of each image.

  x: [b, n, d]; scores, mask: [b, n] (mask after thresholding). Tokens with mask 0 rank below
  every kept token, so they are gathered only when an image keeps fewer than k, and stay masked.
  Returns (x [b, 1 + k, d], mask [b, 1 + k], indices [b, k] into the image tokens 1..n-1).
  """
  n = x.shape[1]
  if not 0 < k <= n - 1:
    raise ValueError(f"Token capacity k={k} must be in [1, {n - 1}] (the image tokens at this "
                     f"stage); fix the capacity passed to ViT.")
  rank = jnp.where(mask[:, 1:] > 0.5, scores[:, 1:], -jnp.inf)
  _, idx = jax.lax.top_k(rank, k)
  idx = idx + 1
  picked = jnp.take_along_axis(x, idx[..., None], axis=1)
  x = jnp.concatenate([x[:, :1], picked], axis=1)
  mask = jnp.concatenate([mask[:, :1], jnp.take_along_axis(mask, idx, axis=1)], axis=1)
  return x, mask, idx - 1


class ThresholdPruner(nn.Module):
  """One pruning stage: a learnable threshold theta (param `threshold`, scalar) and the mask."""
  init_threshold: float = 0.001
  temperature: float = 1e-4

  @nn.compact
  def __call__(self, cls_attn, value_norms, prev_mask, *, train: bool = False):
    """Returns (keep mask [b, n], scores [b, n])."""
    theta = self.param("threshold", nn.initializers.constant(self.init_threshold), (),
                       jnp.float32)
    scores = token_scores(cls_attn, value_norms)
    return threshold_mask(scores, theta, prev_mask, train=train,
                          temperature=self.temperature), scores


def validate_stages(prune_after: Sequence[int], init: Sequence[float], num_layers: int) -> None:
  """Raises ValueError unless the stages are increasing block numbers in [1, num_layers - 1]
  with one initial threshold each."""
  stages = list(prune_after)
  if stages != sorted(set(stages)) or any(not 1 <= s < num_layers for s in stages):
    raise ValueError(f"ViTConfig.prune_after={tuple(prune_after)} must be increasing block "
                     f"numbers in [1, {num_layers - 1}] (prune after block s, 1-indexed).")
  if len(init) != len(stages):
    raise ValueError(f"ViTConfig.threshold_init={tuple(init)} needs one value per pruning stage "
                     f"({len(stages)}: prune_after={tuple(prune_after)}).")
