"""The ViT and its AS-ViT pruning: dense equivalence, class token, packed inference, FLOPs."""
import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adacomp.models.vit import ViT, ViTConfig, build_vit, dense_macs_per_image

DENSE = ViTConfig(image_size=16, patch_size=4, channels=1, num_classes=5, num_layers=4,
                  d_model=32, num_heads=2, head_dim=8, d_ff=64)
PRUNED = dataclasses.replace(DENSE, prune_after=(1, 2), threshold_init=(0.05, 0.06),
                             budget_ratio=0.5)


def _images(b=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, 16, 16, 1))


def _params(cfg=PRUNED):
  return ViT(cfg).init(jax.random.key(1), _images(1))["params"]


def _with_thresholds(params, value):
  params = flax.core.unfreeze(params)
  for name in params:
    if name.startswith("pruner_"):
      params[name]["threshold"] = jnp.asarray(value, jnp.float32)
  return params


def _sown(mutables):
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(mutables["intermediates"]))
  macs = sum(jnp.sum(v.reshape(v.shape[0], -1), -1) for p, vs in flat.items()
             if p[-1] == "macs" for v in vs)
  kept = [flat[p][0] for p in sorted(flat) if p[-1].startswith("kept_stage")]
  return macs, kept


def test_thresholds_at_minus_infinity_prune_nothing_and_equal_the_dense_vit():
  params = _with_thresholds(_params(), -jnp.inf)
  dense_params = {k: v for k, v in params.items() if not k.startswith("pruner_")}
  x = _images()
  dense = ViT(DENSE).apply({"params": dense_params}, x)
  pruned, mutables = ViT(PRUNED).apply({"params": params}, x, mutable=["intermediates"])
  np.testing.assert_allclose(pruned, dense, rtol=1e-6, atol=1e-6)
  macs, kept = _sown(mutables)
  np.testing.assert_allclose(macs, dense_macs_per_image(PRUNED), rtol=1e-6)
  np.testing.assert_array_equal(np.stack(kept), 1.0)
  packed = ViT(PRUNED).apply({"params": params}, x, capacity=(16, 16))
  np.testing.assert_allclose(packed, dense, rtol=1e-5, atol=1e-5)


def test_dense_sown_macs_match_the_formula():
  x = _images(2)
  params = {k: v for k, v in _params().items() if not k.startswith("pruner_")}
  _, mutables = ViT(DENSE).apply({"params": params}, x, mutable=["intermediates"])
  n, d, inner, ff = 17, 32, 16, 64
  by_hand = 16 * 16 * d + 4 * (n * (4 * d * inner + 2 * d * ff) + 2 * inner * n * n) + d * 5
  np.testing.assert_allclose(_sown(mutables)[0], by_hand, rtol=1e-6)


def test_class_token_survives_when_every_image_token_is_pruned():
  params = _with_thresholds(_params(), jnp.inf)
  logits, mutables = ViT(PRUNED).apply({"params": params}, _images(), mutable=["intermediates"])
  macs, kept = _sown(mutables)
  assert np.all(np.isfinite(logits))
  np.testing.assert_array_equal(np.stack(kept), 0.0)
  # Blocks 2..4 run on the class token alone: n = 1 there.
  d, inner, ff = 32, 16, 64
  one = lambda n: n * (4 * d * inner + 2 * d * ff) + 2 * inner * n * n
  np.testing.assert_allclose(macs, 16 * 16 * d + one(17) + 3 * one(1) + d * 5, rtol=1e-6)
  # and the class token's output is what a class-token-only pass gives.
  packed = ViT(PRUNED).apply({"params": params}, _images(), capacity=(1, 1))
  np.testing.assert_allclose(packed, logits, rtol=1e-5, atol=1e-5)


def test_packed_inference_equals_the_exact_masked_model_when_capacity_suffices():
  params = _params()
  x = _images(4)
  masked, mutables = ViT(PRUNED).apply({"params": params}, x, mutable=["intermediates"])
  _, kept = _sown(mutables)
  counts = [int(np.max(np.asarray(k)) * 16 + 0.5) for k in kept]
  assert 0 < counts[-1] < 16, counts  # the thresholds prune some but not all tokens
  packed = ViT(PRUNED).apply({"params": params}, x, capacity=tuple(counts))
  # The packed arrays physically exclude the pruned tokens, so equality means they had no
  # influence on the kept ones.
  np.testing.assert_allclose(packed, masked, rtol=1e-5, atol=1e-5)


def test_packed_inference_compiles_to_fewer_flops():
  params = _params()
  x = _images(8)

  def flops(capacity):
    fn = jax.jit(lambda p, im: ViT(PRUNED).apply({"params": p}, im, capacity=capacity))
    cost = fn.lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])

  dense_params = {k: v for k, v in params.items() if not k.startswith("pruner_")}
  dense_fn = jax.jit(lambda p, im: ViT(DENSE).apply({"params": p}, im))
  dense_cost = dense_fn.lower(dense_params, x).compile().cost_analysis()
  dense_flops = float((dense_cost[0] if isinstance(dense_cost, (list, tuple))
                       else dense_cost)["flops"])
  ratio = flops((8, 4)) / dense_flops
  # Analytic MAC ratio of 17 tokens in block 1, 9 in block 2, 5 in blocks 3-4.
  d, inner, ff = 32, 16, 64
  one = lambda n: n * (4 * d * inner + 2 * d * ff) + 2 * inner * n * n
  ideal = (one(17) + one(9) + 2 * one(5)) / (4 * one(17))
  assert ratio < 0.7, ratio
  assert abs(ratio - ideal) < 0.15, (ratio, ideal)


def test_training_mode_sows_budget_and_distillation_losses():
  params = _params()
  _, mutables = ViT(PRUNED).apply({"params": params}, _images(), train=True, mutable=["losses"])
  losses = mutables["losses"]
  assert set(losses) == {"budget", "distillation"}
  _, inter = ViT(PRUNED).apply({"params": params}, _images(), mutable=["intermediates"])
  fraction = float(jnp.mean(_sown(inter)[0])) / dense_macs_per_image(PRUNED)
  np.testing.assert_allclose(losses["budget"][0], 2.0 * abs(fraction - 0.5), rtol=1e-5)
  assert float(losses["distillation"][0]) >= 0.0


def test_bad_input_names_the_fix():
  with pytest.raises(ValueError, match="image_size"):
    ViT(PRUNED).init(jax.random.key(0), jnp.zeros((1, 20, 20, 1)))
  with pytest.raises(ValueError, match="capacity"):
    ViT(PRUNED).apply({"params": _params()}, _images(), capacity=(4,))
  with pytest.raises(ValueError, match="num_classes"):
    build_vit(1, 10, PRUNED)
