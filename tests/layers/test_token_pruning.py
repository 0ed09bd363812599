"""AS-ViT token scores, threshold masks, packing, and the masked encoder block."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.encoder import EncoderBlock
from layers.token_pruning import (ThresholdPruner, bucket_capacity, pack_batch_k, pack_top_k,
                                  threshold_mask, token_scores, validate_stages)


def test_scores_weight_class_attention_by_each_heads_norm_share():
  cls_attn = np.array([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]], np.float32)  # [b=1, h=2, n=3]
  norms = np.array([[[1.0, 3.0, 1.0], [1.0, 1.0, 3.0]]], np.float32)
  # token 0: 0.5*1/2 + 0.1*1/2; token 1: 0.3*3/4 + 0.1*1/4; token 2: 0.2*1/4 + 0.8*3/4
  expected = np.array([[0.3, 0.25, 0.65]], np.float32)
  np.testing.assert_allclose(token_scores(jnp.asarray(cls_attn), jnp.asarray(norms)), expected,
                             rtol=1e-6)


def _released_scores(params, x, mask):
  """The released AS-ViT score (Cydia2018/AS-ViT vit.py, Attention.forward), in numpy float64
  from the block's weights: attn_out = attn @ v before the projection, head importance = the
  per-head L2 norm of attn_out over the image tokens / (its sum over heads + 1e-8), times the
  class token's attention row, summed over heads. Dropped keys get no attention."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  y = (x - mu) / np.sqrt(var + 1e-6) * p["attn_norm"]["scale"] + p["attn_norm"]["bias"]
  a = p["attn"]
  q, k, v = (np.einsum("bnd,dhk->bhnk", y, a[name]) + a[name + "_bias"][None, :, None, :]
             for name in ("query", "key", "value"))
  z = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
  e = np.exp(z - z.max(-1, keepdims=True)) * np.asarray(mask, np.float64)[:, None, None, :]
  attn = e / e.sum(-1, keepdims=True)
  attn_out = attn @ v  # [b, h, n, d_head]
  importance = np.linalg.norm(attn_out[..., 1:, :], axis=-1)
  importance = importance / (importance.sum(axis=1, keepdims=True) + 1e-8)
  return (attn[:, :, 0, 1:] * importance).sum(axis=1)  # [b, n - 1]


def test_scores_from_an_encoder_block_match_the_released_formula():
  block = EncoderBlock(num_heads=3, head_dim=5, d_ff=16)
  x = jax.random.normal(jax.random.key(0), (2, 7, 12))
  mask = jnp.array([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0], [1.0] * 7])
  params = nn.unbox(block.init(jax.random.key(1), x, mask))
  # Non-zero biases, so the value and attention-output norms cannot coincide by accident.
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape),
                        params)
  _, cls_attn, out_norms = block.apply(params, x, mask)
  scores = token_scores(cls_attn, out_norms)
  np.testing.assert_allclose(scores[:, 1:], _released_scores(params, x, mask), rtol=1e-5,
                             atol=1e-7)


def test_class_token_is_kept_and_dropped_tokens_stay_dropped():
  scores = jnp.array([[0.0, 0.5, 0.05, 0.9]])
  prev = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # token 3 was dropped at an earlier stage
  keep = threshold_mask(scores, 0.1, prev, train=False)
  np.testing.assert_array_equal(keep, [[1.0, 1.0, 0.0, 0.0]])


def test_straight_through_mask_is_hard_forward_and_has_a_threshold_gradient():
  scores = jnp.array([[0.0, 0.10002, 0.09999, 0.3]])

  def kept(theta):
    return jnp.sum(threshold_mask(scores, theta, jnp.ones((1, 4)), train=True))

  assert float(kept(0.1)) == 3.0  # class token + two tokens above 0.1
  grad = jax.grad(kept)(0.1)
  # d/dtheta sum_j sigmoid((s_j - theta) / 1e-4) for the image tokens, by hand.
  z = (np.array([0.10002, 0.09999, 0.3]) - 0.1) / 1e-4
  sig = 1 / (1 + np.exp(-z))
  np.testing.assert_allclose(grad, -np.sum(sig * (1 - sig)) / 1e-4, rtol=1e-3)
  assert grad < 0  # raising the threshold keeps fewer tokens


def test_pack_top_k_gathers_the_class_token_and_the_highest_scored_kept_tokens():
  x = jnp.arange(6, dtype=jnp.float32)[None, :, None] * jnp.ones((2, 6, 3))
  scores = jnp.array([[0.0, 0.1, 0.9, 0.3, 0.8, 0.2], [0.0, 0.5, 0.4, 0.3, 0.2, 0.1]])
  mask = jnp.array([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
  packed, packed_mask, idx = pack_top_k(x, scores, mask, 2)
  # image 0: token 2 is masked, so the top two kept are 4 (0.8) and 3 (0.3);
  # image 1 keeps one token (1) and fills the second slot with a masked one.
  np.testing.assert_array_equal(packed[0, :, 0], [0.0, 4.0, 3.0])
  np.testing.assert_array_equal(packed_mask[0], [1.0, 1.0, 1.0])
  assert packed[1, 1, 0] == 1.0 and packed_mask[1].tolist() == [1.0, 1.0, 0.0]
  np.testing.assert_array_equal(idx[0], [3, 2])
  with pytest.raises(ValueError, match="capacity"):
    pack_top_k(x, scores, mask, 6)


def test_bucket_capacity_rounds_up_to_a_multiple_of_8_within_the_tokens():
  assert [bucket_capacity(k, 64) for k in (0, 1, 8, 9, 41, 63, 64)] == [8, 8, 8, 16, 48, 64, 64]
  assert bucket_capacity(5, 6) == 6 and bucket_capacity(0, 3) == 3
  # A stage of 64 tokens compiles at most 8 shapes for all 65 values of k.
  assert len({bucket_capacity(k, 64) for k in range(65)}) == 8


def test_pack_batch_k_keeps_each_images_k_best_present_tokens_thresholds_aside():
  x = jnp.arange(7, dtype=jnp.float32)[None, :, None] * jnp.ones((2, 7, 2))
  scores = jnp.array([[0.0, 0.1, 0.9, 0.3, 0.8, 0.2, 0.7], [0.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.6]])
  present = jnp.array([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0], [1.0] * 7])
  packed, mask = pack_batch_k(x, scores, present, jnp.int32(2), 4)
  # The released rule, by hand: image 0 ranks the present tokens 4 (0.8), 6 (0.7), 3, 5, 1
  # (token 2 is absent); image 1 ranks 6, 1, 2, 3, ...; each keeps its top 2, padding masked.
  np.testing.assert_array_equal(packed[:, :, 0], [[0, 4, 6, 3, 5], [0, 6, 1, 2, 3]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])


def test_masked_tokens_do_not_influence_kept_tokens_in_an_encoder_block():
  block = EncoderBlock(num_heads=2, head_dim=4, d_ff=16)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  mask = jnp.array([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0]])
  params = block.init(jax.random.key(1), x, mask)
  noise = jax.random.normal(jax.random.key(2), x.shape) * 10.0
  x_other = jnp.where(mask[..., None] > 0, x, x + noise)
  y, cls_attn, _ = block.apply(params, x, mask)
  y_other, _, _ = block.apply(params, x_other, mask)
  kept = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(y_other)[kept], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cls_attn)[:, :, ~kept[0]][0], 0.0)
  np.testing.assert_allclose(jnp.sum(cls_attn, -1), 1.0, rtol=1e-6)


def test_pruner_threshold_is_a_learnable_scalar_with_its_init():
  pruner = ThresholdPruner(init_threshold=0.02)
  attn = jnp.full((1, 2, 4), 0.25)
  norms = jnp.ones((1, 2, 4))
  params = pruner.init(jax.random.key(0), attn, norms, jnp.ones((1, 4)))
  assert float(params["params"]["threshold"]) == pytest.approx(0.02)
  keep, scores = pruner.apply(params, attn, norms, jnp.ones((1, 4)))
  np.testing.assert_allclose(scores, 0.25)
  np.testing.assert_array_equal(keep, 1.0)


def test_bad_stage_configuration_names_the_fix():
  with pytest.raises(ValueError, match="prune_after"):
    validate_stages((4, 2), (0.1, 0.2), 6)
  with pytest.raises(ValueError, match="prune_after"):
    validate_stages((6,), (0.1,), 6)
  with pytest.raises(ValueError, match="threshold_init"):
    validate_stages((2, 4), (0.1,), 6)
