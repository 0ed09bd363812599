"""AS-ViT token scores, threshold masks, packing, and the masked encoder block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.encoder import EncoderBlock
from layers.token_pruning import (ThresholdPruner, pack_top_k, threshold_mask, token_scores,
                                  validate_stages)


def test_scores_weight_class_attention_by_each_heads_value_norm_share():
  cls_attn = np.array([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]], np.float32)  # [b=1, h=2, n=3]
  norms = np.array([[[1.0, 3.0, 1.0], [1.0, 1.0, 3.0]]], np.float32)
  # token 0: 0.5*1/2 + 0.1*1/2; token 1: 0.3*3/4 + 0.1*1/4; token 2: 0.2*1/4 + 0.8*3/4
  expected = np.array([[0.3, 0.25, 0.65]], np.float32)
  np.testing.assert_allclose(token_scores(jnp.asarray(cls_attn), jnp.asarray(norms)), expected,
                             rtol=1e-6)


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
