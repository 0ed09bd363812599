"""Adaptive Sparse ViT token pruning: class-attention scores against learned thresholds.

AS-ViT (Liu et al., "Adaptive Sparse ViT: Towards Learnable Adaptive Token Pruning by Fully
Exploiting Self-Attention", arXiv 2209.13802) scores every image token j after a pruning block
by the class token's attention, weighting each head by its share of the token's attention-output
norm, O_h = A_h V_h being head h's attention output before the output projection:

    s_j = sum_h A_h[cls, j] * ||O_h[j]|| / (sum_h' ||O_h'[j]|| + 1e-8)

and keeps the tokens whose score exceeds the stage's learned threshold theta (one scalar per
pruning stage). The class token is never dropped, and a token dropped at one stage stays dropped
at every later one (its mask multiplies into the next stage's).

Checked against the released code (Cydia2018/AS-ViT vit.py, `Attention.forward`, read with the
fetch tool): `attn_out = attn @ v` ([B, H, N, d_head], before `proj`), `head_importance =
attn_out[..., 1:, :].norm(dim=-1)` (the image tokens' rows, L2 over a head's channels),
divided by its sum over heads + 1e-8, times `attn[:, :, 0, 1:]` (the class token's attention
row), summed over heads. `tests/layers/test_token_pruning.py` recomputes that formula
independently from q, k, v of an encoder block's weights and compares.

Choices, and where this differs from the released code:
  * Training uses a straight-through mask: forward value 1[s > theta], gradient that of
    sigmoid((s - theta) / temperature), temperature 1e-4 as in the paper (the released
    `AdaptiveSparsityModule`). Masked softmax then keeps dropped tokens out of attention.
    The released masked softmax adds eps / N to every probability and lets a dropped token
    attend to itself; here a dropped key gets exactly zero attention (dropped tokens' own rows
    never reach a kept token, so only their scores, ~1e-8 there and 0 here, differ).
  * Inference has three forms. `mask` (hard 0/1 mask, every token still computed) gives the
    exact per-image decisions, used for accuracy and compute accounting. `pack_top_k` gathers
    per image the top-k tokens by score into a smaller array (k a static capacity); of those,
    the ones under the threshold stay masked, so packing equals the mask form for every image
    with at most k tokens above threshold. `pack_batch_k` is the released batched rule: every
    image keeps its k = floor(total kept in the batch / B) highest-scored tokens, thresholds
    aside; the array is padded to a bucket (`bucket_capacity`, k rounded up to a multiple of
    8) so that a few compiled shapes serve every k.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def token_scores(cls_attn, out_norms):
  """s [b, n] from class-attention probabilities and attention-output norms, both [b, h, n]."""
  share = out_norms / (jnp.sum(out_norms, axis=1, keepdims=True) + 1e-8)
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


def bucket_capacity(k: int, tokens: int, multiple: int = 8) -> int:
  """The compiled capacity for a per-batch k: k rounded up to `multiple` (at least one
  multiple), capped at the `tokens` image tokens present, so a stage compiles at most
  ceil(tokens / multiple) shapes."""
  return min(max(multiple, -(-int(k) // multiple) * multiple), tokens)


def pack_batch_k(x, scores, present, k, capacity: int):
  """The released batched rule: each image keeps its `k` highest-scored present tokens.

  x: [b, n, d]; scores, present: [b, n] (present: the tokens alive before this stage's
  threshold); k: int scalar, may be traced, <= capacity; capacity: static >= 1. Gathers the
  class token and the top-`capacity` present tokens, then masks the slots of rank >= k, so the
  result computes like exactly k tokens per image. Returns (x [b, 1 + capacity, d],
  mask [b, 1 + capacity]).
  """
  x, mask, _ = pack_top_k(x, scores, present, capacity)
  rank_ok = (jnp.arange(capacity) < k).astype(mask.dtype)
  return x, mask.at[:, 1:].multiply(rank_ok[None, :])


class ThresholdPruner(nn.Module):
  """One pruning stage: a learnable threshold theta (param `threshold`, scalar) and the mask."""
  init_threshold: float = 0.001
  temperature: float = 1e-4

  @nn.compact
  def __call__(self, cls_attn, out_norms, prev_mask, *, train: bool = False):
    """Returns (keep mask [b, n], scores [b, n])."""
    theta = self.param("threshold", nn.initializers.constant(self.init_threshold), (),
                       jnp.float32)
    scores = token_scores(cls_attn, out_norms)
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
