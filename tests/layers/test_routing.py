"""RoutedFFN / RoutedAttention: informed execute-or-approximate vs greedy execute-or-skip."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import MultiHeadAttention
from layers.mlp import DenseFFN, ffn_macs
from layers import routing
from layers.routing import RoutedAttention, RoutedFFN, TokenRouter, executed_tokens

B, T, D, F, H, HD = 2, 16, 32, 64, 2, 16
SPARSITIES = (0.0, 0.25, 0.5, 0.75)


def _x(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


def _positions():
  return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _params(module, *args):
  params = nn.meta.unbox(module.init(jax.random.key(7), *args)["params"])
  if "forecaster" in params:  # a trained-looking forecaster, not the zero init
    up = params["forecaster"]["up"]
    params["forecaster"]["up"] = 0.1 * jax.random.normal(jax.random.key(8), up.shape)
  return params


def _apply(module, params, *args, **kw):
  y, state = jax.jit(lambda p, *a: module.apply(
      {"params": p}, *a, mutable=["intermediates", "losses"], **kw))(params, *args)
  inter = state["intermediates"]
  return y, np.asarray(inter["executed"][0]).astype(bool), np.asarray(inter["macs"][0]), \
      state.get("losses", {})


def _router_scores(module, params, x):
  """The ranking score, recomputed from the router's parameters in numpy."""
  r = params["router"]
  h = np.maximum(np.asarray(x) @ r["hidden"]["kernel"] + r["hidden"]["bias"], 0.0)
  logits = h @ r["logits"]["kernel"] + r["logits"]["bias"]
  return logits.sum(-1) if module.mode == "informed" else logits[..., 0]


@pytest.mark.parametrize("mode", ["informed", "greedy"])
def test_sparsity_zero_is_exactly_the_dense_ffn_and_its_macs(mode):
  module = RoutedFFN(d_ff=F, sparsity=0.0, mode=mode)
  params = _params(module, _x())
  y, executed, macs, _ = _apply(module, params, _x())
  dense = jax.jit(lambda p, x: DenseFFN(d_ff=F).apply({"params": p}, x))(
      {"wi": params["wi"], "wo": params["wo"]}, _x())
  np.testing.assert_array_equal(y, dense)
  assert executed.all()
  np.testing.assert_array_equal(macs, np.full((B, T), ffn_macs(D, F)))


@pytest.mark.parametrize("mode", ["informed", "greedy"])
def test_sparsity_zero_is_exactly_the_dense_attention_and_its_macs(mode):
  module = RoutedAttention(H, HD, sparsity=0.0, mode=mode)
  params = _params(module, _x(), _positions())
  y, executed, macs, _ = _apply(module, params, _x(), _positions())
  dense, state = jax.jit(lambda p, x, pos: MultiHeadAttention(H, HD).apply(
      {"params": p}, x, pos, mutable=["intermediates"]))(
          {k: params[k] for k in ("query", "key", "value", "out")}, _x(), _positions())
  np.testing.assert_array_equal(y, dense)
  assert executed.all()
  np.testing.assert_array_equal(macs, state["intermediates"]["macs"][0])


@pytest.mark.parametrize("mode", ["informed", "greedy"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_router_executes_exactly_its_capacity_the_top_scores(sparsity, mode):
  """(The gather path takes the same decisions: test_gather_path_equals_masked_path.)"""
  module = RoutedFFN(d_ff=F, sparsity=sparsity, mode=mode)
  params = _params(module, _x())
  _, executed, _, _ = _apply(module, params, _x())
  k = math.ceil((1 - sparsity) * T)
  np.testing.assert_array_equal(executed.sum(axis=1), [k] * B)
  if sparsity:
    scores = _router_scores(module, params, _x())
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    for b in range(B):
      assert set(np.flatnonzero(executed[b])) == set(top[b])


def test_executed_tokens_rounds_up_and_refuses_bad_sparsity():
  assert [executed_tokens(s, 10) for s in (0.0, 0.25, 0.5, 0.75, 1.0)] == [10, 8, 5, 3, 0]
  with pytest.raises(ValueError, match="fraction of tokens that do not execute"):
    executed_tokens(1.5, 10)


@pytest.mark.parametrize("compute", ["masked", "gather"])
@pytest.mark.parametrize("mode", ["informed", "greedy"])
def test_unexecuted_tokens_take_the_forecast_or_the_identity(mode, compute):
  module = RoutedFFN(d_ff=F, sparsity=0.5, mode=mode, compute=compute)
  params = _params(module, _x())
  y, executed, _, _ = _apply(module, params, _x())
  x = np.asarray(_x(), np.float64)
  unit = np.asarray(DenseFFN(d_ff=F).apply(
      {"params": {"wi": params["wi"], "wo": params["wo"]}}, _x()))
  if mode == "informed":
    other = x @ params["forecaster"]["down"] @ params["forecaster"]["up"]
  else:
    other = np.zeros_like(x)
  expected = np.where(executed[..., None], unit, other)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["informed", "greedy"])
def test_gather_path_equals_masked_path(mode):
  for cls, args in ((RoutedFFN, (_x(),)), (RoutedAttention, (_x(), _positions()))):
    kw = dict(d_ff=F) if cls is RoutedFFN else dict(num_heads=H, head_dim=HD)
    masked = cls(**kw, sparsity=0.75, mode=mode, compute="masked")
    params = _params(masked, *args)
    y_masked, ex_masked, macs_masked, _ = _apply(masked, params, *args)
    y_gather, ex_gather, macs_gather, _ = _apply(masked.clone(compute="gather"), params, *args)
    np.testing.assert_allclose(y_gather, y_masked, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ex_gather, ex_masked)
    np.testing.assert_array_equal(macs_gather, macs_masked)


@pytest.mark.parametrize("mode", ["informed", "greedy"])
def test_routed_attention_runs_on_the_executed_subsequence_only(mode):
  """Executed tokens attend to executed tokens only: dense attention on that subsequence."""
  module = RoutedAttention(H, HD, sparsity=0.5, mode=mode)
  params = _params(module, _x(), _positions())
  y, executed, _, _ = _apply(module, params, _x(), _positions())
  dense = MultiHeadAttention(H, HD)
  dense_params = {"params": {k: params[k] for k in ("query", "key", "value", "out")}}
  for b in range(B):
    idx = np.flatnonzero(executed[b])
    sub = dense.apply(dense_params, _x()[b:b + 1, idx], jnp.asarray(idx)[None])
    np.testing.assert_allclose(y[b, idx], sub[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["informed", "greedy"])
def test_reported_macs_match_the_decisions(mode):
  module = RoutedFFN(d_ff=F, sparsity=0.25, mode=mode, forecaster_rank=4, router_hidden=8)
  params = _params(module, _x())
  _, executed, macs, _ = _apply(module, params, _x())
  router = D * 8 + 8 * (2 if mode == "informed" else 1)
  other = 2 * D * 4 if mode == "informed" else 0
  np.testing.assert_array_equal(macs, np.where(executed, 2 * D * F, other) + router)

  att = RoutedAttention(H, HD, sparsity=0.25, mode=mode, forecaster_rank=4, router_hidden=8)
  params = _params(att, _x(), _positions())
  _, executed, macs, _ = _apply(att, params, _x(), _positions())
  inner = H * HD
  # An executed token sees the executed tokens at or before it.
  visible = np.cumsum(executed, axis=1)
  unit = 4 * D * inner + 2 * inner * visible
  np.testing.assert_array_equal(macs, np.where(executed, unit, other) + router)


def test_imposed_routes_are_honoured():
  module = RoutedFFN(d_ff=F, sparsity=0.5, mode="greedy")
  params = _params(module, _x())
  routes = np.zeros((B, T), np.int32)
  routes[:, ::3] = 1
  y, executed, _, _ = _apply(module, params, _x(), routes=routes)
  np.testing.assert_array_equal(executed, routes > 0)
  assert np.all(np.asarray(y)[routes == 0] == 0)


def test_straight_through_gradient_reaches_the_router_only_through_its_importance():
  module = RoutedFFN(d_ff=F, sparsity=0.5, mode="informed")
  params = _params(module, _x())
  loss = lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, _x())))
  grads = jax.grad(loss)(params)
  kernel = np.asarray(grads["router"]["logits"]["kernel"])
  assert np.abs(kernel[:, 0]).sum() > 0  # importance: from the task loss
  assert np.all(kernel[:, 1] == 0)  # error head: from its regression loss only


@pytest.mark.parametrize("compute", ["masked", "gather"])
def test_losses_distillation_and_recoverability_are_sown(compute):
  """Masked: means over every token; gather (training with real savings): over the executed
  tokens, the only ones with u there."""
  module = RoutedFFN(d_ff=F, sparsity=0.5, mode="informed", distill_weight=2.0, compute=compute)
  params = _params(module, _x())
  _, executed, _, losses = _apply(module, params, _x())
  over = (np.ones((B, T), bool) if compute == "masked" else np.asarray(executed, bool))
  unit = DenseFFN(d_ff=F).apply({"params": {"wi": params["wi"], "wo": params["wo"]}}, _x())
  forecast = np.asarray(_x()) @ params["forecaster"]["down"] @ params["forecaster"]["up"]
  sq = np.mean((np.asarray(unit) - forecast) ** 2, axis=-1)  # [b, t]
  np.testing.assert_allclose(losses["forecast_distill"][0], 2.0 * np.mean(sq[over]), rtol=1e-5)
  # w_r * mean (e - log(mean_features (u - u_hat)^2 + 1e-6))^2, e the router's second output.
  r = params["router"]
  h = np.maximum(np.asarray(_x()) @ r["hidden"]["kernel"] + r["hidden"]["bias"], 0.0)
  e = (h @ r["logits"]["kernel"] + r["logits"]["bias"])[..., 1]
  target = np.log(sq + 1e-6)
  np.testing.assert_allclose(losses["routing_recoverability"][0],
                             np.mean(((e - target) ** 2)[over]), rtol=1e-4)


def test_gather_training_step_gives_the_masked_unit_gradients_and_router_values():
  """MoD trains the whole model: in gather compute the unit's parameters get the masked
  path's gradients (the straight-through term is zero in value) for a loss over every token."""
  module = RoutedFFN(d_ff=F, sparsity=0.5, mode="greedy", compute="masked")
  params = _params(module, _x())
  weight = jax.random.normal(jax.random.key(3), (B, T, D))

  def loss(p, m):
    return jnp.sum(jnp.sin(m.apply({"params": p}, _x())) * weight)

  masked = jax.grad(lambda p: loss(p, module))(params)
  gather = jax.grad(lambda p: loss(p, module.clone(compute="gather")))(params)
  for name in ("wi", "wo"):
    np.testing.assert_allclose(gather[name], masked[name], rtol=1e-5,
                               atol=1e-5 * float(np.abs(masked[name]).max()))
  assert float(np.abs(masked["wi"]).max()) > 0


@pytest.mark.parametrize("mode", ["informed", "greedy"])
def test_compiled_flops_fall_with_sparsity_in_the_gather_path(mode):
  x = jax.random.normal(jax.random.key(0), (2, 128, 64))
  flops = []
  for sparsity in (0.0, 0.5, 0.75):
    module = RoutedFFN(d_ff=256, sparsity=sparsity, mode=mode, compute="gather")
    params = _params(module, x)
    compiled = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, x).compile()
    cost = compiled.cost_analysis()
    flops.append(float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]))
  assert all(a > b for a, b in zip(flops, flops[1:])), flops
  # The FFN dominates: 75% sparsity costs well under half the dense FLOPs.
  assert flops[-1] < 0.5 * flops[0], flops


def test_routed_attention_decodes_only_with_causal_decisions():
  module = RoutedAttention(H, HD, sparsity=0.5)
  with pytest.raises(ValueError, match="decision = 'causal'"):
    module.init(jax.random.key(0), _x(), _positions(), decode=True)


def test_imposed_routes_need_the_masked_path():
  module = RoutedFFN(d_ff=F, sparsity=0.5, compute="gather")
  params = _params(module.clone(compute="masked"), _x())
  with pytest.raises(ValueError, match="compute='masked'"):
    module.apply({"params": params}, _x(), routes=np.ones((B, T), np.int32))


def _unit_case(unit):
  if unit == "ffn":
    return RoutedFFN, dict(d_ff=F), (_x(),)
  return RoutedAttention, dict(num_heads=H, head_dim=HD), (_x(), _positions())


@pytest.mark.parametrize("unit", ["ffn", "attention"])
def test_router_gradients_agree_between_masked_and_gather_and_match_the_formula(unit):
  """Both paths: y_i + (s_i - sg(s_i)) (u_i - u_hat_i) on executed tokens, s = sigmoid(a), so
  d loss / d a_i = s_i (1 - s_i) <d loss / d y_i, u_i - u_hat_i> there, 0 for the error head.
  The loss weighs executed tokens only: the gather path has no u for the others."""
  cls, kw, args = _unit_case(unit)
  module = cls(**kw, sparsity=0.5, mode="informed", compute="masked")
  params = _params(module, *args)
  y, executed, _, _ = _apply(module, params, *args)
  weight = jax.random.normal(jax.random.key(11), (B, T, D)) * executed[..., None]

  def loss(p, m):
    return jnp.sum(jnp.sin(m.apply({"params": p}, *args)) * weight)

  masked = jax.jit(jax.grad(lambda p: loss(p, module)))(params)["router"]
  gather = jax.jit(jax.grad(lambda p: loss(p, module.clone(compute="gather"))))(params)["router"]
  # ~1e-5 of each parameter's largest gradient: float32 sums in another order, nothing more.
  close = lambda rtol: lambda a, b: np.testing.assert_allclose(
      a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))
  jax.tree.map(close(1e-5), masked, gather)

  x = np.asarray(args[0], np.float64)
  forecast = x @ params["forecaster"]["down"] @ params["forecaster"]["up"]
  router = TokenRouter(D // 4, 2)
  logits, vjp = jax.vjp(lambda p: router.apply({"params": p}, args[0]), params["router"])
  s = 1 / (1 + np.exp(-np.asarray(logits[..., 0], np.float64)))
  y = np.asarray(y, np.float64)  # = u on executed tokens
  d_a = executed * s * (1 - s) * np.sum(np.cos(y) * np.asarray(weight) * (y - forecast), -1)
  (want,) = vjp(jnp.stack([d_a, np.zeros_like(d_a)], -1).astype(jnp.float32))
  jax.tree.map(close(1e-4), gather, want)


def _with_lora(params, rank, seed=None):
  """params of a RoutedFFN plus LoRA adapters of `rank` (B zero, or random with `seed`)."""
  lora = _params(RoutedFFN(d_ff=F, sparsity=0.5, lora_rank=rank), _x())
  out = {**params, "lora_wi": lora["lora_wi"], "lora_wo": lora["lora_wo"]}
  if seed is not None:
    for i, name in enumerate(("lora_wi", "lora_wo")):
      b = out[name]["b"]
      out[name] = {**out[name], "b": 0.1 * jax.random.normal(jax.random.key(seed + i), b.shape)}
  return out


@pytest.mark.parametrize("compute", ["masked", "gather"])
def test_lora_adapters_start_as_the_unadapted_unit(compute):
  base = RoutedFFN(d_ff=F, sparsity=0.5, compute=compute)
  params = _params(base.clone(compute="masked"), _x())
  lora = _with_lora(params, 4)
  assert not np.any(lora["lora_wi"]["b"]) and not np.any(lora["lora_wo"]["b"])
  y, executed, _, _ = _apply(base, params, _x())
  y_lora, executed_lora, _, _ = _apply(base.clone(lora_rank=4), lora, _x())
  np.testing.assert_array_equal(y_lora, y)
  np.testing.assert_array_equal(executed_lora, executed)


@pytest.mark.parametrize("compute", ["masked", "gather"])
def test_lora_unit_is_the_adapted_ffn_and_pays_the_adapters(compute):
  module = RoutedFFN(d_ff=F, sparsity=0.5, compute=compute, lora_rank=4)
  params = _with_lora(_params(module.clone(lora_rank=None, compute="masked"), _x()), 4, seed=3)
  y, executed, macs, _ = _apply(module, params, _x())
  x = np.asarray(_x(), np.float64)
  lora = lambda name, v: v @ params[name]["a"] @ params[name]["b"]
  h = _gelu(x @ params["wi"] + lora("lora_wi", x))
  unit = h @ params["wo"] + lora("lora_wo", h)
  forecast = x @ params["forecaster"]["down"] @ params["forecaster"]["up"]
  np.testing.assert_allclose(y, np.where(executed[..., None], unit, forecast), rtol=1e-4,
                             atol=1e-5)
  adapters = 4 * (D + F) + 4 * (F + D)
  router = D * (D // 4) + (D // 4) * 2
  np.testing.assert_array_equal(
      macs, np.where(executed, 2 * D * F + adapters, 2 * D * (D // 8)) + router)


def _gelu(h):
  return 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))


# -- causal routing --------------------------------------------------------------------------

def _causal_params(module, *args, threshold=0.1):
  params = _params(module, *args)
  params["causal_threshold"] = jnp.asarray(threshold, jnp.float32)
  return params


def _causal_scores(params, x):
  """The causal predictor's logit, recomputed in numpy."""
  r = params["causal"]
  h = np.maximum(np.asarray(x) @ r["hidden"]["kernel"] + r["hidden"]["bias"], 0.0)
  return (h @ r["logits"]["kernel"] + r["logits"]["bias"])[..., 0]


@pytest.mark.parametrize("mode", ["informed", "greedy"])
@pytest.mark.parametrize("compute", ["masked", "gather"])
def test_causal_ffn_executes_the_tokens_above_the_threshold(mode, compute):
  module = RoutedFFN(d_ff=F, sparsity=0.5, mode=mode, compute=compute, decision="causal")
  params = _causal_params(module, _x())
  y, executed, macs, losses = _apply(module, params, _x())
  want = _causal_scores(params, _x()) > 0.1
  np.testing.assert_array_equal(executed, want)
  assert 0 < want.sum() < want.size
  dense = DenseFFN(d_ff=F).apply({"params": {"wi": params["wi"], "wo": params["wo"]}}, _x())
  x = np.asarray(_x())
  other = (x @ params["forecaster"]["down"] @ params["forecaster"]["up"] if mode == "informed"
           else np.zeros_like(x))
  np.testing.assert_allclose(y, np.where(want[..., None], dense, other), rtol=1e-5, atol=1e-5)
  router = TokenRouter(D // 4, 1).macs(D)
  unit = ffn_macs(D, F)
  lff = 2 * D * (D // 8) if mode == "informed" else 0
  np.testing.assert_array_equal(macs, np.where(want, unit, lff) + router)
  assert not losses  # inference: nothing to train


@pytest.mark.parametrize("mode", ["informed", "greedy"])
@pytest.mark.parametrize("count", [1, 17, 40, 49, 95])
def test_causal_gather_ffn_pads_its_bucket_without_touching_the_other_tokens(mode, count):
  """n = 96 flattened tokens, exactly `count` above the threshold: the bucket (count rounded up
  to 16, 32, 48, ...) runs the FFN on `count` executed tokens and some that do not execute;
  those padded slots keep their forecast (or 0), and every executed token gets the dense FFN."""
  x = jax.random.normal(jax.random.key(3), (2, 48, D))
  module = RoutedFFN(d_ff=F, sparsity=0.5, mode=mode, compute="gather", decision="causal")
  params = _causal_params(module, x)
  scores = np.sort(_causal_scores(params, x).ravel())[::-1]
  params["causal_threshold"] = jnp.asarray((scores[count - 1] + scores[count]) / 2, jnp.float32)
  sizes = np.asarray(routing.bucket_sizes(x.shape[0] * x.shape[1]))
  assert sizes[np.searchsorted(sizes, count)] > count or count == 1  # slots are padded
  y, executed, _, _ = _apply(module, params, x)
  assert executed.sum() == count
  np.testing.assert_array_equal(executed, _causal_scores(params, x) > params["causal_threshold"])
  dense = DenseFFN(d_ff=F).apply({"params": {"wi": params["wi"], "wo": params["wo"]}}, x)
  xn = np.asarray(x)
  other = (xn @ params["forecaster"]["down"] @ params["forecaster"]["up"] if mode == "informed"
           else np.zeros_like(xn))
  np.testing.assert_allclose(y, np.where(executed[..., None], dense, other), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("compute", ["masked", "gather"])
def test_causal_attention_attends_to_the_executed_tokens_up_to_itself(compute):
  module = RoutedAttention(H, HD, sparsity=0.5, mode="greedy", compute=compute,
                           decision="causal")
  params = _causal_params(module, _x(), _positions())
  y, executed, _, _ = _apply(module, params, _x(), _positions())
  mha = {k: params[k] for k in ("query", "key", "value", "out")}
  for row in range(B):
    idx = np.flatnonzero(executed[row])
    sub = _x()[row:row + 1, idx]
    want = MultiHeadAttention(H, HD).apply({"params": mha}, sub, jnp.asarray(idx)[None])
    np.testing.assert_allclose(y[row, idx], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y[row])[~executed[row]], 0.0)


@pytest.mark.parametrize("compute", ["masked", "gather"])
@pytest.mark.parametrize("mode", ["informed", "greedy"])
def test_routed_attention_kv_cache_equals_the_causal_pass(compute, mode):
  """Prefill 5 tokens, then decode one by one: every position as the full causal pass."""
  module = RoutedAttention(H, HD, sparsity=0.5, mode=mode, compute=compute, decision="causal")
  params = _causal_params(module, _x(), _positions())
  full, executed, _, _ = _apply(module, params, _x(), _positions())
  dec = module.clone(compute=compute)
  cache = dec.init(jax.random.key(0), _x(), _positions(), decode=True)["cache"]
  step = jax.jit(lambda c, x: dec.apply({"params": params, "cache": c}, x, _positions()[:, :x.shape[1]],
                                        decode=True, mutable=["cache"]))
  outs = []
  y, state = step(cache, _x()[:, :5])
  outs.append(y)
  cache = state["cache"]
  for position in range(5, T):
    y, state = step(cache, _x()[:, position:position + 1])
    cache = state["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cache["cached_executed"]), executed)


def test_causal_losses_are_the_bce_toward_top_k_and_the_threshold_pinball():
  module = RoutedFFN(d_ff=F, sparsity=0.75, mode="greedy", causal_weight=2.0)
  params = _causal_params(module, _x(), threshold=0.3)
  _, executed, _, losses = _apply(module, params, _x())
  c = _causal_scores(params, _x())
  target = executed.astype(np.float32)
  bce = np.mean(np.logaddexp(0.0, c) - target * c)
  r = c - 0.3
  pinball = np.mean(np.maximum(0.75 * r, -0.25 * r))
  np.testing.assert_allclose(losses["routing_causal"][0], 2.0 * (bce + pinball), rtol=1e-5)


def test_causal_losses_train_only_the_predictor_and_its_threshold():
  """Stop-gradient input: the auxiliary loss cannot change the model's function."""
  module = RoutedFFN(d_ff=F, sparsity=0.5, mode="informed")
  params = _causal_params(module, _x())

  def loss(p, x):
    _, state = module.apply({"params": p}, x, mutable=["losses", "intermediates"])
    return state["losses"]["routing_causal"][0]

  gp, gx = jax.grad(loss, argnums=(0, 1))(params, _x())
  np.testing.assert_array_equal(gx, 0.0)
  for name, g in gp.items():
    nonzero = any(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(g))
    assert nonzero == (name in ("causal", "causal_threshold")), name


def test_threshold_pinball_minimiser_is_the_sparsity_quantile():
  """Gradient descent on tau alone lands on the q-quantile of fixed logits."""
  c = np.asarray(jax.random.normal(jax.random.key(3), (4000,)))
  q = 0.75
  grad = jax.grad(lambda tau: jnp.mean(jnp.maximum(q * (c - tau), (q - 1) * (c - tau))))
  tau = 0.0
  for i in range(3000):
    tau = tau - 0.01 * float(grad(tau))
  assert abs(np.mean(c > tau) - (1 - q)) < 0.01


# -- gated (SwiGLU / GeGLU) and biased FFN units: DenseFFN's parameters ----------------------

FORMS = [dict(gated=True), dict(use_bias=True), dict(gated=True, use_bias=True)]


def _form_params(module, seed=11):
  """A RoutedFFN's params with nonzero biases (their init is zero)."""
  params = _params(module, _x())
  for i, name in enumerate(n for n in ("bi", "bi_gate", "bo") if n in params):
    params[name] = 0.1 * jax.random.normal(jax.random.key(seed + i), params[name].shape)
  return params


def _dense_of(params):
  return {k: v for k, v in params.items() if k[:2] in ("wi", "wo", "bi", "bo")}


@pytest.mark.parametrize("form", FORMS, ids=lambda f: "-".join(sorted(f)))
@pytest.mark.parametrize("mode", ["informed", "greedy"])
def test_gated_and_biased_units_at_sparsity_zero_are_dense_ffn(form, mode):
  module = RoutedFFN(d_ff=F, sparsity=0.0, mode=mode, activation="silu", **form)
  params = _form_params(module)
  dense = DenseFFN(d_ff=F, activation="silu", **form)
  dense_shapes = jax.tree.map(jnp.shape, nn.meta.unbox(
      dense.init(jax.random.key(0), _x())["params"]))
  assert jax.tree.map(jnp.shape, _dense_of(params)) == dense_shapes  # same names and shapes
  y, executed, macs, _ = _apply(module, params, _x())
  want, state = dense.apply({"params": _dense_of(params)}, _x(), mutable=["intermediates"])
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  assert executed.all()
  np.testing.assert_array_equal(macs, state["intermediates"]["macs"][0])
  assert macs[0, 0] == ffn_macs(D, F) * (1.5 if form.get("gated") else 1)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: "-".join(sorted(f)))
@pytest.mark.parametrize("mode", ["informed", "greedy"])
def test_gated_and_biased_units_masked_gather_and_causal_agree_with_dense_ffn(form, mode):
  """Sparsity 0.5: every path runs DenseFFN on the executed tokens, the forecast (or 0) on
  the others; masked and gather give the same values, decisions and MACs."""
  masked = RoutedFFN(d_ff=F, sparsity=0.5, mode=mode, activation="silu", **form)
  params = _causal_params(masked, _x())
  for i, name in enumerate(n for n in ("bi", "bi_gate", "bo") if n in params):
    params[name] = 0.1 * jax.random.normal(jax.random.key(11 + i), params[name].shape)
  unit = DenseFFN(d_ff=F, activation="silu", **form).apply({"params": _dense_of(params)}, _x())
  x = np.asarray(_x())
  other = (x @ params["forecaster"]["down"] @ params["forecaster"]["up"] if mode == "informed"
           else np.zeros_like(x))
  for decision in ("topk", "causal"):
    runs = [_apply(masked.clone(compute=c, decision=decision), params, _x())
            for c in ("masked", "gather")]
    (y_m, ex_m, macs_m, _), (y_g, ex_g, macs_g, _) = runs
    assert 0 < ex_m.sum() < ex_m.size
    np.testing.assert_allclose(y_m, np.where(ex_m[..., None], unit, other), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(y_g, y_m, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ex_g, ex_m)
    np.testing.assert_array_equal(macs_g, macs_m)


def _silu(h):
  return h / (1 + np.exp(-h))


@pytest.mark.parametrize("compute, decision", [("masked", "topk"), ("gather", "topk"),
                                               ("gather", "causal")])
def test_lora_on_the_gated_biased_unit_adapts_all_three_matrices(compute, decision):
  module = RoutedFFN(d_ff=F, sparsity=0.5, compute=compute, lora_rank=4, gated=True,
                     use_bias=True, activation="silu", decision=decision)
  params = _form_params(module)
  params["causal_threshold"] = jnp.asarray(0.1, jnp.float32)
  assert {"lora_wi", "lora_wi_gate", "lora_wo"} <= set(params)
  for i, name in enumerate(("lora_wi", "lora_wi_gate", "lora_wo")):
    b = params[name]["b"]
    params[name] = {**params[name], "b": 0.1 * jax.random.normal(jax.random.key(20 + i), b.shape)}
  y, executed, macs, _ = _apply(module, params, _x())
  x = np.asarray(_x(), np.float64)
  lora = lambda name, v: v @ params[name]["a"] @ params[name]["b"]
  gate = x @ params["wi_gate"] + params["bi_gate"] + lora("lora_wi_gate", x)
  h = _silu(gate) * (x @ params["wi"] + params["bi"] + lora("lora_wi", x))
  unit = h @ params["wo"] + params["bo"] + lora("lora_wo", h)
  forecast = x @ params["forecaster"]["down"] @ params["forecaster"]["up"]
  np.testing.assert_allclose(y, np.where(executed[..., None], unit, forecast), rtol=1e-4,
                             atol=1e-5)
  if decision == "causal":
    np.testing.assert_array_equal(executed, _causal_scores(params, _x()) > 0.1)
  assert 0 < executed.sum() < executed.size
  adapters = 2 * 4 * (D + F) + 4 * (F + D)
  router = D * (D // 4) + (D // 4) * (1 if decision == "causal" else 2)  # predictor / router
  np.testing.assert_array_equal(
      macs, np.where(executed, 3 * D * F + adapters, 2 * D * (D // 8)) + router)


@pytest.mark.parametrize("n", [1, 5, 32, 200, 257, 1024, 4096, 8192])
def test_bucket_sizes_pad_a_count_by_a_sixteenth_of_itself(n):
  """Every count c in [0, n] gets a bucket >= it, padded by fewer than 16 * ceil(c / 256)
  slots when c >= 16 (about 1/16 of c, whatever n: a 75%-sparse layer of n = 1024 tokens,
  c = 257, takes 272 slots, not 320), by at most c itself below 16 (powers of two); the
  switch has at most ~16 branches per doubling of n above 256."""
  sizes = np.asarray(routing.bucket_sizes(n))
  assert sizes[0] == 0 and sizes[-1] == n and np.all(np.diff(sizes) > 0)
  counts = np.arange(n + 1)
  chosen = sizes[np.searchsorted(sizes, counts)]
  assert np.all(chosen >= counts)
  large = counts >= 16
  assert np.all(chosen[large] - counts[large] < 16 * np.ceil(counts[large] / 256))
  small = (counts > 0) & ~large
  assert np.all(chosen[small] <= np.minimum(2 * counts[small], n))
  assert len(sizes) <= 2 + 4 + 16 + 16 * math.ceil(math.log2(max(n, 256) / 256))
