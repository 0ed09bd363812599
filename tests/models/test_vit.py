"""The ViT and its AS-ViT pruning: dense equivalence, class token, packed inference, FLOPs."""
import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adacomp.models.vit import (ViT, ViTConfig, batch_k_apply, build_vit, dense_macs_per_image,
                                released_teacher_gmacs)

DENSE = ViTConfig(image_size=16, patch_size=4, channels=1, num_classes=5, num_layers=4,
                  d_model=32, num_heads=2, head_dim=8, d_ff=64)
PRUNED = dataclasses.replace(DENSE, prune_after=(1, 2), threshold_init=(0.05, 0.06),
                             budget_ratio=0.5)


def _images(b=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, 16, 16, 1))


def _params(cfg=PRUNED):
  params = flax.core.unfreeze(nn.unbox(ViT(cfg).init(jax.random.key(1), _images(1))["params"]))
  # The head starts at zero; random weights make the logits depend on the tokens kept.
  params["head"] = jax.random.normal(jax.random.key(2), params["head"].shape)
  return params


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


@pytest.mark.parametrize("capacity", [(8, 4), (11, 3)])
def test_packed_inference_compiles_to_the_flops_of_the_kept_tokens(capacity):
  params = _params()
  x = _images(8)

  def flops(fn, p):
    cost = jax.jit(fn).lower(p, x).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

  dense_params = {k: v for k, v in params.items() if not k.startswith("pruner_")}
  ratio = (flops(lambda p, im: ViT(PRUNED).apply({"params": p}, im, capacity=capacity), params)
           / flops(lambda p, im: ViT(DENSE).apply({"params": p}, im), dense_params))
  # MAC ratio by the formula: 17 tokens in block 1, 1 + k_1 in block 2, 1 + k_2 in blocks 3-4,
  # plus the patch embedding and the head. XLA's count adds the element-wise work (norms,
  # softmax, GeLU, top-k), a few per cent here.
  d, inner, ff = 32, 16, 64
  one = lambda n: n * (4 * d * inner + 2 * d * ff) + 2 * inner * n * n
  rest = 16 * 16 * d + d * 5
  ideal = (rest + one(17) + one(1 + capacity[0]) + 2 * one(1 + capacity[1])) / (rest + 4 * one(17))
  assert ratio == pytest.approx(ideal, rel=0.05), (ratio, ideal)


def test_training_mode_sows_budget_and_distillation_losses():
  params = _params()
  _, mutables = ViT(PRUNED).apply({"params": params}, _images(), train=True, mutable=["losses"])
  losses = mutables["losses"]
  assert set(losses) == {"budget", "distillation"}
  _, inter = ViT(PRUNED).apply({"params": params}, _images(), mutable=["intermediates"])
  fraction = float(jnp.mean(_sown(inter)[0])) / dense_macs_per_image(PRUNED)
  np.testing.assert_allclose(losses["budget"][0], 2.0 * abs(fraction - 0.5), rtol=1e-5)
  # Distillation: 0.5 * mean KL(teacher || student), the teacher the dense pass, by hand.
  teacher = np.asarray(ViT(DENSE).apply(
      {"params": {k: v for k, v in params.items() if not k.startswith("pruner_")}}, _images()),
      np.float64)
  student = np.asarray(ViT(PRUNED).apply({"params": params}, _images()), np.float64)
  log_t = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
  log_s = student - np.log(np.exp(student).sum(-1, keepdims=True))
  kl = np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)
  assert np.max(np.abs(teacher - student)) > 1e-2  # pruning changed the logits
  np.testing.assert_allclose(losses["distillation"][0], 0.5 * np.mean(kl), rtol=1e-4)


def test_released_budget_form_is_in_gmacs_against_the_teachers_released_count():
  cfg = dataclasses.replace(PRUNED, budget_form="gflops", budget_weight=3.0)
  params = _params(cfg)
  _, mutables = ViT(cfg).apply({"params": params}, _images(), train=True, mutable=["losses"])
  _, inter = ViT(cfg).apply({"params": params}, _images(), mutable=["intermediates"])
  # The released count: patch embedding + blocks on kept tokens and the class token, no head
  # (the sown MACs minus the head's d * classes), against the teacher's patch embedding +
  # blocks on the 16 image tokens alone (vit.py cal_flops).
  student = np.asarray(_sown(inter)[0]) - 32 * 5
  d, inner, ff = 32, 16, 64
  teacher = 16 * 16 * d + 4 * (16 * (4 * d * inner + 2 * d * ff) + 2 * inner * 16 ** 2)
  assert released_teacher_gmacs(cfg) == pytest.approx(teacher / 1e9)
  expected = 3.0 * abs(np.mean(student) / 1e9 - 0.5 * teacher / 1e9)
  np.testing.assert_allclose(mutables["losses"]["budget"][0], expected, rtol=1e-5)
  with pytest.raises(ValueError, match="budget_form"):
    ViT(dataclasses.replace(PRUNED, budget_form="flops")).init(jax.random.key(0), _images(1))


def test_batch_k_inference_keeps_floor_of_the_mean_kept_count_per_image():
  params = _with_thresholds(_params(), 0.0)
  params["pruner_0"]["threshold"] = jnp.float32(0.045)
  params["pruner_1"]["threshold"] = jnp.float32(0.06)
  x = _images(6)
  model = ViT(PRUNED)
  logits, ks = batch_k_apply(model, params, x)
  # The released rule, built from the static-capacity path: k_1 = floor(sum of tokens over
  # the stage-1 threshold / B); every image keeps its top k_1 by score (thresholds aside,
  # i.e. threshold -inf with capacity k_1); then k_2 likewise on the packed tokens.
  _, inter = model.apply({"params": params}, x, mutable=["intermediates"])
  counts1 = np.round(np.asarray(_sown(inter)[1][0]) * 16).astype(int)
  k1 = int(counts1.sum()) // 6
  assert len(set(counts1.tolist())) > 1 and k1 % 8, counts1  # images differ, k_1 pads
  top1 = dict(params, pruner_0={"threshold": jnp.float32(-jnp.inf)})
  _, inter = model.apply({"params": top1}, x, capacity=(k1, k1), mutable=["intermediates"])
  k2 = int(np.round(np.asarray(_sown(inter)[1][1]) * 16).sum()) // 6
  assert ks == (k1, k2)
  top2 = _with_thresholds(params, -jnp.inf)
  expected = model.apply({"params": top2}, x, capacity=(k1, max(k2, 1)))
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  # Padding images (weight 0) do not count toward k.
  padded = jnp.concatenate([x, jnp.zeros_like(x[:2])])
  logits_p, ks_p = batch_k_apply(model, params, padded, weights=np.array([1] * 6 + [0] * 2))
  assert ks_p == ks
  np.testing.assert_allclose(logits_p[:6], logits, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_fix():
  with pytest.raises(ValueError, match="image_size"):
    ViT(PRUNED).init(jax.random.key(0), jnp.zeros((1, 20, 20, 1)))
  with pytest.raises(ValueError, match="capacity"):
    ViT(PRUNED).apply({"params": _params()}, _images(), capacity=(4,))
  with pytest.raises(ValueError, match="num_classes"):
    build_vit(1, 10, PRUNED)
