"""DuoFFN (Duo-LLM): big / small / skip routing per token, its compute paths and accounting."""
import dataclasses
import functools
import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adacomp.methods.duo import factories as duo_factories  # pylint: disable=unused-import  (registers duo_ffn)
from adacomp import sharding, training
from adacomp.models import build
from adacomp.models.decoder import DecoderConfig, DecoderLM
from layers.block import DecoderBlock
from layers.duo import BIG, SKIP, SMALL, DuoFFN, ragged_ffn
from layers.mlp import DenseFFN

B, T, D, F = 2, 8, 16, 64
F_SMALL = F // 4


def _x(shape=(B, T, D), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _routes(shape=(B, T), seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, 3)


def _params(module, x, **kw):
  init = jax.jit(lambda key, x: module.init(key, x, **kw))
  return nn.meta.unbox(init(jax.random.key(7), x)["params"])


@pytest.fixture(scope="module", name="p")
def _shared_params():
  """DuoFFN(d_ff=F)'s parameters: one tree serves every mode and compute path."""
  return _params(DuoFFN(d_ff=F), _x())


def _gelu(h):
  return 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))


def _expected(p, x, routes):
  """Per token: the big FFN, the small FFN or 0 by route, in numpy from the params."""
  x = np.asarray(x, np.float64)
  big = _gelu(x @ p["wi"]) @ p["wo"]
  small = _gelu(x @ p["wi_small"]) @ p["wo_small"]
  r = np.asarray(routes)[..., None]
  return np.where(r == BIG, big, np.where(r == SMALL, small, 0.0))


def _apply(module, p, x, *, routes=None, rngs=None):
  """(y, routes taken, macs, sown losses), jitted: eager flax is slow op by op."""
  apply = jax.jit(lambda p, x, routes, rngs: module.apply(
      {"params": p}, x, routes=routes, rngs=rngs, mutable=["intermediates", "losses"]))
  y, state = apply(p, x, routes, rngs)
  inter = state["intermediates"]
  return y, inter["routes"][0], inter["macs"][0], state.get("losses", {})


def _expected_overflow(routes, k_small, k_big):
  """The gather path's overflow rule, row by row, token by token in position order, with
  k_small and k_big slots per row."""
  taken = np.full(routes.shape, SKIP)
  for i, row in enumerate(routes):
    big_left, demoted = k_big, []
    for j, r in enumerate(row):
      if r == BIG:
        if big_left:
          taken[i, j], big_left = BIG, big_left - 1
        else:
          demoted.append(j)
    small_left = k_small
    for j in [j for j, r in enumerate(row) if r == SMALL] + demoted:
      if small_left:
        taken[i, j], small_left = SMALL, small_left - 1
  return taken


@pytest.mark.parametrize("compute", ["masked", "gather"])
def test_imposed_routes_are_honoured_per_token(compute, p):
  x, routes = _x(), _routes()
  # mode="skip" would zero every token: the output shows the imposed routes win.
  module = DuoFFN(d_ff=F, mode="skip", compute=compute)
  y, taken, _, _ = _apply(module, p, x, routes=routes)
  np.testing.assert_array_equal(taken, routes)
  np.testing.assert_allclose(y, _expected(p, x, routes), rtol=1e-4, atol=1e-5)
  assert not np.asarray(y)[np.asarray(routes) == SKIP].any()


@pytest.mark.parametrize("compute", ["masked", "gather"])
def test_all_big_route_equals_dense_ffn(compute, p):
  x = _x()
  module = DuoFFN(d_ff=F, mode="big", compute=compute)
  y, _, macs, _ = _apply(module, p, x)
  dense_y, dense_state = DenseFFN(d_ff=F).apply(
      {"params": {"wi": p["wi"], "wo": p["wo"]}}, x, mutable=["intermediates"])
  np.testing.assert_allclose(y, dense_y, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(macs, dense_state["intermediates"]["macs"][0])


class _NoFFN(nn.Module):
  """A block FFN slot that adds nothing: the block reduces to its attention residual."""
  d_ff: int
  activation: str = "gelu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, routes=None):
    return jnp.zeros_like(x)


def test_all_skip_routes_make_the_block_its_attention_residual_only():
  x = _x()
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  block = DecoderBlock(num_heads=2, head_dim=8, d_ff=F, ffn_cls=DuoFFN)
  p = _params(block, x, positions=positions)
  skip = jax.jit(block.apply)({"params": p}, x, positions, routes=jnp.full((B, T), SKIP))
  no_ffn = jax.jit(DecoderBlock(num_heads=2, head_dim=8, d_ff=F, ffn_cls=_NoFFN).apply)(
      {"params": {k: v for k, v in p.items() if k != "ffn"}}, x, positions)
  np.testing.assert_array_equal(skip, no_ffn)


@pytest.mark.parametrize("mode", ["random", "router"])
def test_macs_match_the_routes(mode, p):
  x = _x()
  module = DuoFFN(d_ff=F, mode=mode)
  _, routes, macs, _ = _apply(module, p, x)
  router = D * 3 if mode == "router" else 0
  want = np.choose(np.asarray(routes), [0, 2 * D * F_SMALL, 2 * D * F]) + router
  np.testing.assert_array_equal(macs, want)
  assert macs.dtype == jnp.float32 and len(set(np.asarray(routes).ravel())) == 3


def test_random_route_frequencies_match_mix(p):
  mix = np.array([0.2, 0.3, 0.5])
  x = _x((8, 256, D))
  module = DuoFFN(d_ff=F, mode="random", mix=tuple(mix))
  _, routes, _, _ = _apply(module, p, x, rngs={"routing": jax.random.key(3)})
  n = routes.size
  counts = np.bincount(np.asarray(routes).ravel(), minlength=3)
  # 4.5 binomial standard deviations: a false alarm about once in 10^5 runs per route.
  np.testing.assert_array_less(np.abs(counts - n * mix), 4.5 * np.sqrt(n * mix * (1 - mix)))


def test_evaluation_random_routes_are_seeded_independent_per_layer_and_follow_the_mix():
  """No routing rng (evaluation): each scanned layer draws its own seeded pattern over the
  positions, the same in every row (a function of seed, layer and position)."""
  mix, num_layers, b, t = np.array([0.2, 0.3, 0.5]), 4, 2, 512
  cfg = DecoderConfig(vocab_size=40, num_layers=num_layers, d_model=16, num_heads=2,
                      head_dim=8, d_ff=32, max_len=t,
                      ffn_cls=functools.partial(DuoFFN, mode="random", mix=tuple(mix)))
  ids = jax.random.randint(jax.random.key(1), (b, t), 0, 40)

  def routes_of(config, params):
    _, state = jax.jit(functools.partial(DecoderLM(config).apply, mutable=["intermediates"]))(
        {"params": params}, ids)
    inter = state["intermediates"]
    if "blocks" in inter:
      return np.asarray(inter["blocks"]["ffn"]["routes"][0])
    return np.stack([np.asarray(inter[f"block_{i}"]["ffn"]["routes"][0])
                     for i in range(num_layers)])

  params = _params(DecoderLM(cfg), ids)
  routes = routes_of(cfg, params)
  np.testing.assert_array_equal(routes, routes_of(cfg, params))  # deterministic
  np.testing.assert_array_equal(routes[:, 0], routes[:, 1])      # rows share the positions' draws
  unrolled = DecoderConfig(**{**cfg.__dict__, "scan_layers": False})
  np.testing.assert_array_equal(routes, routes_of(unrolled, _scan_to_unrolled(params, num_layers)))
  for layer in range(num_layers):
    counts = np.bincount(routes[layer, 0], minlength=3)
    # 4.5 binomial standard deviations per route: a false alarm about once in 10^5.
    np.testing.assert_array_less(np.abs(counts - t * mix), 4.5 * np.sqrt(t * mix * (1 - mix)))
  # Independent layers agree on a position with probability sum_m p_m^2 = 0.38; one shared
  # pattern (the seed key without the layer) would agree everywhere.
  agree_p = float(np.sum(mix ** 2))
  for i in range(num_layers):
    for j in range(i + 1, num_layers):
      agree = np.mean(routes[i, 0] == routes[j, 0])
      assert abs(agree - agree_p) < 4.5 * np.sqrt(agree_p * (1 - agree_p) / t), (i, j, agree)
  other_seed = DecoderConfig(**{**cfg.__dict__, "ffn_cls": functools.partial(
      DuoFFN, mode="random", mix=tuple(mix), seed=1)})
  assert np.mean(routes_of(other_seed, params) == routes) < 0.5


def _router_logits(p, x):
  r = p["router"]["logits"]
  return np.asarray(x) @ r["kernel"] + r["bias"]


def test_router_routes_are_the_argmax_of_its_logits_at_inference(p):
  x = _x((4, 32, D))
  module = DuoFFN(d_ff=F, mode="router")
  y, routes, _, _ = _apply(module, p, x)
  want = np.argmax(_router_logits(p, x), -1)
  np.testing.assert_array_equal(routes, want)
  np.testing.assert_allclose(y, _expected(p, x, want), rtol=1e-4, atol=1e-5)


def test_router_training_routes_are_hard_and_the_router_gets_a_gradient(p):
  x = _x()
  module = DuoFFN(d_ff=F, mode="router", budget_weight=0.0)
  rngs = {"routing": jax.random.key(4)}
  y, routes, _, _ = _apply(module, p, x, rngs=rngs)
  np.testing.assert_allclose(y, _expected(p, x, routes), rtol=1e-4, atol=1e-5)
  # Gumbel noise: training routes are samples, not the inference argmax.
  assert not np.array_equal(routes, np.argmax(_router_logits(p, x), -1))
  grads = jax.jit(jax.grad(
      lambda q: jnp.sum(module.apply({"params": q}, x, rngs=rngs) ** 2)))(p)
  assert np.abs(grads["router"]["logits"]["kernel"]).max() > 0


def test_budget_loss_is_the_squared_distance_of_mean_probabilities_to_the_budget(p):
  x = _x()
  budget = (0.5, 0.3, 0.2)
  module = DuoFFN(d_ff=F, mode="router", budget=budget, budget_weight=3.0)
  _, _, _, losses = _apply(module, p, x, rngs={"routing": jax.random.key(4)})
  logits = _router_logits(p, x)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = 3.0 * np.sum((probs.reshape(-1, 3).mean(0) - np.array(budget)) ** 2)
  np.testing.assert_allclose(losses["duo_budget"][0], want, rtol=1e-5)


def test_budget_loss_gradient_moves_route_fractions_toward_the_budget(p):
  x = _x((4, 64, D))
  budget = np.array([0.1, 0.1, 0.8])
  module = DuoFFN(d_ff=F, mode="router", budget=tuple(budget))

  def budget_loss(q):
    _, state = module.apply({"params": q}, x, mutable=["losses"])
    return state["losses"]["duo_budget"][0]

  def fractions(q):
    _, routes, _, _ = _apply(module, q, x)
    return np.bincount(np.asarray(routes).ravel(), minlength=3) / routes.size

  before = np.abs(fractions(p) - budget).sum()
  step = jax.jit(lambda q: jax.tree.map(lambda a, g: a - 2.0 * g, q, jax.grad(budget_loss)(q)))
  for _ in range(30):
    p = step(p)
  after = np.abs(fractions(p) - budget).sum()
  assert after < 0.5 * before, (before, after)


def test_train_router_only_stops_gradients_into_the_ffns(p):
  x = _x()
  module = DuoFFN(d_ff=F, mode="router", train_router_only=True)
  grads = jax.jit(jax.grad(lambda q: jnp.sum(module.apply(
      {"params": q}, x, rngs={"routing": jax.random.key(4)}) ** 2)))(p)
  for name in ("wi", "wo", "wi_small", "wo_small"):
    np.testing.assert_array_equal(grads[name], 0)
  assert np.abs(grads["router"]["logits"]["kernel"]).max() > 0


@pytest.mark.parametrize("capacity", [None, (0.5, 0.5)])
def test_gather_path_equals_masked_path_when_capacity_suffices(capacity, p):
  x = _x()
  routes = jnp.array([[BIG, SMALL, SKIP, BIG, SMALL, SKIP, BIG, SMALL]] * B)  # 6 of 16 each
  masked = DuoFFN(d_ff=F, compute="masked")
  want, _, want_macs, _ = _apply(masked, p, x, routes=routes)
  y, taken, macs, _ = _apply(masked.clone(compute="gather", capacity=capacity), p, x,
                             routes=routes)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(taken, routes)
  np.testing.assert_array_equal(macs, want_macs)


# 4 rows of 6 tokens (big: 4, 2, 4, 6 per row; small: 1, 3, 1, 0). BIG keeps 2 per row. With
# 2 small slots per row, rows 0 and 2 take one demoted big token, row 3 two, and row 1 skips
# one of its 3 small tokens; with 1 slot only row 3 takes a demoted token and row 1 skips 2.
@pytest.mark.parametrize("k_small, demoted, small_skipped", [(2, 4, 1), (1, 1, 2)])
def test_gather_path_overflow_demotes_big_to_small_then_skips(k_small, demoted, small_skipped, p):
  x = _x((4, 6, D))
  routes = jax.random.choice(jax.random.key(2), 3, (4, 6), p=jnp.array([0.1, 0.2, 0.7]))
  k_big = 2
  module = DuoFFN(d_ff=F, compute="gather", capacity=(k_small / 6, k_big / 6))
  y, taken, macs, _ = _apply(module, p, x, routes=routes)
  r, want = np.asarray(routes), _expected_overflow(np.asarray(routes), k_small, k_big)
  assert ((r == BIG) & (want == SMALL)).sum() == demoted
  assert ((r == SMALL) & (want == SKIP)).sum() == small_skipped
  np.testing.assert_array_equal(taken, want)
  np.testing.assert_allclose(y, _expected(p, x, want), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(macs, np.choose(want, [0, 2 * D * F_SMALL, 2 * D * F]))


def test_gather_rows_are_independent_of_the_rest_of_the_batch_under_binding_capacity(p):
  """Capacity is per sequence row: a row's output and routes are the same alone and in a batch
  whose other rows route very differently (all big), with capacity binding in every row."""
  x = _x((4, T, D), seed=3)
  routes = jnp.concatenate([_routes((1, T), seed=4), jnp.full((3, T), BIG)])
  module = DuoFFN(d_ff=F, compute="gather", capacity=(0.25, 0.25))
  batch_y, batch_taken, _, _ = _apply(module, p, x, routes=routes)
  alone_y, alone_taken, _, _ = _apply(module, p, x[:1], routes=routes[:1])
  np.testing.assert_array_equal(batch_taken[:1], alone_taken)
  np.testing.assert_allclose(batch_y[:1], alone_y, rtol=1e-5, atol=1e-5)
  assert (np.asarray(batch_taken[1:]) == BIG).sum(axis=1).tolist() == [2, 2, 2]  # it binds
  np.testing.assert_array_equal(
      alone_taken, _expected_overflow(np.asarray(routes[:1]), 2, 2))


def test_gather_path_compiled_flops_fall_with_capacity(p):
  x = _x((4, 16, D))
  routes = jnp.full((4, 16), BIG)

  def flops(capacity):
    module = DuoFFN(d_ff=F, compute="gather", capacity=capacity)
    f = jax.jit(lambda q, x: module.apply({"params": q}, x, routes=routes))
    cost = f.lower(p, x).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  quarter, half, full = flops((0.25, 0.25)), flops((0.5, 0.5)), flops((1.0, 1.0))
  assert quarter < half < full
  # The FFN matmuls dominate and scale with the capacity; routing overhead is small.
  np.testing.assert_allclose([quarter / full, half / full], [0.25, 0.5], rtol=0.1)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_sorted_path_equals_masked_path(impl, activation, p):
  x, routes = _x(), _routes()
  masked = DuoFFN(d_ff=F, activation=activation)
  want, _, want_macs, _ = _apply(masked, p, x, routes=routes)
  y, taken, macs, _ = _apply(masked.clone(compute="sorted", impl=impl), p, x, routes=routes)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(taken, routes)
  np.testing.assert_array_equal(macs, want_macs)
  if activation == "gelu":  # the model's exact GeLU, written independently in numpy
    np.testing.assert_allclose(y, _expected(p, x, routes), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m, n_small, n_big", [
    (96, 17, 75), (96, 0, 40), (96, 33, 0), (96, 1, 95), (96, 0, 0),
    (5, 2, 3), (7, 3, 1), (300, 40, 259), (300, 150, 131)])
def test_ragged_ffn_runs_each_route_on_its_bucket_and_masks_the_padding(m, n_small, n_big):
  """ragged_ffn on m rows in shuffled order, n_small small and n_big big routes (buckets of
  multiples of ragged_chunk(m), so most are padded; 17 + 75 of 96 and
  40 + 259 of 300 put the big bucket past the last row, where it starts earlier and masks
  the small rows it covers; m = 5, 7 decode-sized): every row is its own route's FFN,
  computed here row by row in numpy, and a skipped row is 0."""
  d, f = 8, 32
  rng = np.random.default_rng(m * 10_000 + n_small * 100 + n_big)
  routes = np.full(m, SKIP)
  routes[:n_small], routes[n_small:n_small + n_big] = SMALL, BIG
  routes = rng.permutation(routes)
  x = rng.normal(size=(m, d)).astype(np.float32)
  small = {"wi": rng.normal(size=(d, f // 4)).astype(np.float32),
           "wo": rng.normal(size=(f // 4, d)).astype(np.float32)}
  big = {"wi": rng.normal(size=(d, f)).astype(np.float32),
         "wo": rng.normal(size=(f, d)).astype(np.float32)}
  y = jax.jit(lambda x, r, s, b: ragged_ffn(x, r, s, b, "relu"))(x, jnp.asarray(routes),
                                                                     small, big)
  relu = lambda h: np.maximum(h, 0)
  expected = np.stack([relu(x[i] @ big["wi"]) @ big["wo"] if r == BIG else
                       relu(x[i] @ small["wi"]) @ small["wo"] if r == SMALL else np.zeros(d)
                       for i, r in enumerate(routes)])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)


def test_exact_mix_draws_round_p_t_of_each_route_per_row_at_uniform_positions(p):
  mix, t = (0.2, 0.3, 0.5), 20
  module = DuoFFN(d_ff=F, mix=mix, mix_exact=True)
  _, routes, _, _ = _apply(module, p, _x((256, t, D)), rngs={"routing": jax.random.key(3)})
  routes = np.asarray(routes)
  for r, n in ((SKIP, 4), (SMALL, 6), (BIG, 10)):
    assert ((routes == r).sum(axis=1) == n).all()
    # Every position takes route r with probability n / t (4.5 binomial sd per position).
    freq = (routes == r).mean(axis=0)
    sd = np.sqrt(n / t * (1 - n / t) / routes.shape[0])
    np.testing.assert_array_less(np.abs(freq - n / t), 4.5 * sd)


def _duo_grad(module, p, x):
  """(loss, grads) of a random-route DuoFFN under a training routing rng."""
  def loss(q):
    return jnp.mean(jnp.square(module.apply({"params": q}, x, rngs={"routing": jax.random.key(5)})))
  return jax.jit(jax.value_and_grad(loss))(p)


@pytest.mark.parametrize("impl", ["xla", "auto", "interpret"])
def test_sorted_exact_mix_training_is_the_masked_function(impl, p):
  x = _x((2, 16, D))
  masked = DuoFFN(d_ff=F, mix=(0.2, 0.3, 0.5), mix_exact=True)
  want = _duo_grad(masked, p, x)
  got = _duo_grad(masked.clone(compute="sorted", impl=impl), p, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _compiled_flops(f, *args):
  cost = jax.jit(f).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_sorted_exact_mix_training_compiles_to_the_routed_flops(p):
  """Forward and backward: masked runs both FFNs (1 + 1/4 of the big one per token); sorted
  with the mix (0.2, 0.3, 0.5) runs 0.5 big + 0.3 small = 0.575 of it."""
  x = _x((4, 32, D))
  masked = DuoFFN(d_ff=F, mix=(0.2, 0.3, 0.5), mix_exact=True)
  grad = lambda m: jax.grad(lambda q, x: jnp.sum(jnp.square(m.apply(
      {"params": q}, x, rngs={"routing": jax.random.key(5)}))))
  ratio = (_compiled_flops(grad(masked.clone(compute="sorted", impl="xla")), p, x)
           / _compiled_flops(grad(masked), p, x))
  np.testing.assert_allclose(ratio, (0.5 + 0.3 / 4) / (1 + 1 / 4), rtol=0.05)


CFG = DecoderConfig(vocab_size=40, num_layers=2, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                    max_len=32, ffn_cls=DuoFFN)


def _scan_to_unrolled(params, num_layers):
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(num_layers):
    out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
  return out


def test_scanned_and_unrolled_decoders_honour_per_layer_routes():
  ids = jax.random.randint(jax.random.key(1), (B, T), 0, 40)
  routes = _routes((CFG.num_layers, B, T))
  scanned = DecoderLM(CFG)
  p = _params(scanned, ids)
  apply = lambda model: jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
  apply_scanned = apply(scanned)
  got, state = apply_scanned({"params": p}, ids, routes=routes)
  np.testing.assert_array_equal(state["intermediates"]["blocks"]["ffn"]["routes"][0], routes)
  unrolled = DecoderLM(DecoderConfig(**{**CFG.__dict__, "scan_layers": False}))
  want, unrolled_state = apply(unrolled)(
      {"params": _scan_to_unrolled(p, CFG.num_layers)}, ids, routes=routes)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for i in range(CFG.num_layers):
    np.testing.assert_array_equal(
        unrolled_state["intermediates"][f"block_{i}"]["ffn"]["routes"][0], routes[i])
  all_big, _ = apply_scanned({"params": p}, ids, routes=jnp.full_like(routes, BIG))
  assert not np.allclose(got, all_big, atol=1e-4)


def _one_train_step(model):
  """One step of adacomp.training on a random batch, as tests/adacomp/sharding_check.py does."""
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  rules = sharding.logical_axis_rules()
  tx = training.make_optimizer(10, learning_rate=1e-2, warmup_steps=0)
  ids = np.random.default_rng(0).integers(0, 259, (2, 9))
  batch = {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
           "weights": np.ones((2, 8), np.float32), "target_bytes": np.ones((2, 8), np.float32)}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, _, _ = training.init_train_state(model, tx, 8, 0, mesh, rules)
    new_state, metrics = jax.jit(training.make_train_step(model, tx, 0))(
        state, sharding.global_batch(batch, mesh))
  return state, new_state, jax.device_get(metrics)


GIN = """
DecoderConfig.num_layers = 1
DecoderConfig.d_model = 32
DecoderConfig.num_heads = 2
DecoderConfig.head_dim = 16
DecoderConfig.d_ff = 64
DecoderConfig.max_len = 16
DecoderConfig.ffn_cls = @duo_ffn()
duo_ffn.mode = 'router'
duo_ffn.d_ff_small = 8
duo_ffn.budget = (0.2, 0.3, 0.5)
"""


def test_gin_selects_duo_ffn_and_a_train_step_adds_its_budget_loss():
  gin.parse_config(GIN)
  model = build.build_decoder(259, DecoderConfig())
  state, new_state, metrics = _one_train_step(model)
  assert state.params["blocks"]["ffn"]["wi_small"].shape == (1, 32, 8)
  assert metrics["aux_loss"] > 0 and np.isfinite(metrics["loss"])
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, new_state.params)
  assert moved["blocks"]["ffn"]["router"]["logits"]["kernel"]


def test_budget_loss_reaches_the_losses_collection_from_scanned_layers():
  ids = jnp.zeros((B, T), jnp.int32)
  model = DecoderLM(DecoderConfig(**{**CFG.__dict__, "ffn_cls": functools.partial(
      DuoFFN, mode="router")}))
  _, state = jax.jit(functools.partial(model.apply, mutable=["losses"]))(
      {"params": _params(model, ids)}, ids, rngs={"routing": jax.random.key(0)})
  assert jax.tree.leaves(state.get("losses", {}))


STAGE1_GIN = """
DecoderConfig.num_layers = 2
DecoderConfig.d_model = 32
DecoderConfig.num_heads = 2
DecoderConfig.head_dim = 16
DecoderConfig.d_ff = 64
DecoderConfig.max_len = 16
"""


def _stage1_losses(compute, steps=3):
  """Losses of a few adacomp.training steps of configs/duo.gin (stage 1) at a tiny size."""
  gin.clear_config()
  gin.parse_config_files_and_bindings(["configs/duo.gin"], [STAGE1_GIN,
                                                            f"duo_ffn.compute = '{compute}'"])
  model = build.build_decoder(259, DecoderConfig())
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  rules = sharding.logical_axis_rules()
  tx = training.make_optimizer(10, learning_rate=1e-2, warmup_steps=0)
  ids = np.random.default_rng(0).integers(0, 259, (2, 17))
  batch = {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
           "weights": np.ones((2, 16), np.float32), "target_bytes": np.ones((2, 16), np.float32)}
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, _, _ = training.init_train_state(model, tx, 16, 0, mesh, rules)
    step = jax.jit(training.make_train_step(model, tx, 0))
    for _ in range(steps):
      state, metrics = step(state, sharding.global_batch(batch, mesh))
      losses.append(float(jax.device_get(metrics["loss"])))
  gin.clear_config()
  return losses


def test_stage1_config_trains_sorted_on_the_masked_loss_curve():
  """configs/duo.gin (sorted, mix_exact) follows the masked path step by step: same function."""
  sorted_losses = _stage1_losses("sorted")
  np.testing.assert_allclose(sorted_losses, _stage1_losses("masked"), rtol=1e-5, atol=1e-5)
  assert sorted_losses[-1] < sorted_losses[0]


DECODE_CFG = DecoderConfig(vocab_size=50, num_layers=3, d_model=32, num_heads=2, head_dim=16,
                           d_ff=64, max_len=32,
                           ffn_cls=functools.partial(DuoFFN, mode="router", compute="sorted"))


# Every mode and schedule on XLA; routed_ffn's (interpreted) kernels once for each mode and
# each schedule, which is the same kernel code: the routes and the layer mask are its inputs.
@pytest.mark.parametrize("mode, skip, impl", [
    ("router", False, "xla"), ("router", True, "xla"), ("random", False, "xla"),
    ("random", True, "xla"), ("router", True, "interpret"), ("random", False, "interpret")])
def test_kv_cache_decoding_equals_the_full_pass(mode, skip, impl):
  """Decoding with routed compute (the decode step's b rows sorted by route: ragged_ffn on XLA,
  routed_ffn's kernels otherwise) gives the teacher-forced full pass's logits (the masked
  path), for router and evaluation-time random routes, with every layer or under a SkipDecode
  schedule (its layer-masked pass)."""
  from adacomp import decoding  # pylint: disable=g-import-not-at-top
  from adacomp.methods.skipdecode import schedule as skip_schedule  # pylint: disable=g-import-not-at-top
  tokens = jax.random.randint(jax.random.key(3), (4, 10), 0, 50)
  cfg = dataclasses.replace(DECODE_CFG, ffn_cls=functools.partial(
      DuoFFN, mode=mode, compute="sorted", impl=impl))
  masked = dataclasses.replace(DECODE_CFG, ffn_cls=functools.partial(DuoFFN, mode=mode))
  params = _params(DecoderLM(masked), tokens)
  n = DECODE_CFG.num_layers
  if skip:
    schedule = skip_schedule.linear_skip_schedule(10, n, min_active=1, warmup_len=3,
                                                  warmup_layers=1)
    mask = jnp.asarray(skip_schedule.active_layer_mask(schedule, n, warmup_layers=1))
  else:
    schedule, mask = skip_schedule.full_schedule(10, n), None
  want, state = jax.jit(functools.partial(DecoderLM(masked).apply, mutable=["intermediates"]))(
      {"params": params}, tokens, layer_mask=mask)
  routes = np.asarray(state["intermediates"]["blocks"]["ffn"]["routes"][0])
  assert set(routes.ravel()) == {SKIP, SMALL, BIG}   # every route occurs: not vacuous
  got = decoding.teacher_forced_logits(decoding.Decoder(cfg, warmup_layers=1), params, tokens,
                                       schedule, prompt_len=3)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


# Gated (SwiGLU / GeGLU) and biased FFNs: the pretrained families' forms (Llama, GPT-2, OPT).
FORMS = [(True, False), (False, True), (True, True)]


def _form_params(gated, use_bias):
  """A gated / biased DuoFFN's params, the (zero-initialised) biases made random so they count."""
  module = DuoFFN(d_ff=F, activation="silu", gated=gated, use_bias=use_bias)
  p = _params(module, _x())
  keys = iter(jax.random.split(jax.random.key(11), len(p)))
  return module, {k: jax.random.normal(next(keys), v.shape) if k.startswith("b") else v
                  for k, v in p.items()}


def _dense(p, suffix, gated, use_bias, x, d_ff):
  """DenseFFN (layers/mlp.py) at width d_ff with Duo's parameters of one module."""
  names = ["wi", "wo"] + ["wi_gate"] * gated + ["bi", "bo"] * use_bias + ["bi_gate"] * (
      gated and use_bias)
  dense = DenseFFN(d_ff=d_ff, activation="silu", gated=gated, use_bias=use_bias)
  y, state = dense.apply({"params": {n: p[n + suffix] for n in names}}, x,
                         mutable=["intermediates"])
  return y, state["intermediates"]["macs"][0]


@pytest.mark.parametrize("compute", ["masked", "gather", "sorted"])
@pytest.mark.parametrize("gated, use_bias", FORMS)
def test_gated_and_biased_forms_all_big_all_small_all_skip(gated, use_bias, compute):
  module, p = _form_params(gated, use_bias)
  module = module.clone(compute=compute, impl="xla")
  x = _x()
  dense_p = nn.meta.unbox(DenseFFN(d_ff=F, gated=gated, use_bias=use_bias).init(
      jax.random.key(0), x)["params"])
  # The big FFN is DenseFFN's parameter tree exactly (names and shapes): a dense checkpoint loads.
  assert {k: v.shape for k, v in dense_p.items()} == {k: p[k].shape for k in dense_p}
  assert set(p) - set(dense_p) == {"router"} | {k + "_small" for k in dense_p}
  for route, suffix, width in ((BIG, "", F), (SMALL, "_small", F_SMALL)):
    y, _, macs, _ = _apply(module, p, x, routes=jnp.full((B, T), route))
    want, want_macs = _dense(p, suffix, gated, use_bias, x, width)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(macs, want_macs)  # 1.5x the plain FFN's when gated
  y, _, macs, _ = _apply(module, p, x, routes=jnp.full((B, T), SKIP))
  assert not np.asarray(y).any() and not np.asarray(macs).any()


@pytest.mark.parametrize("gated, use_bias", FORMS)
def test_gated_and_biased_forms_agree_on_every_compute_path(gated, use_bias):
  """Random imposed routes: masked == gather == sorted (ragged on XLA; the interpret impl too,
  which falls back to XLA for these forms); exact-mix training: sorted's static slices give the
  masked path's loss and gradients."""
  module, p = _form_params(gated, use_bias)
  x, routes = _x(), _routes()
  want, _, want_macs, _ = _apply(module, p, x, routes=routes)
  assert set(np.asarray(routes).ravel()) == {SKIP, SMALL, BIG}
  for compute, impl in (("gather", None), ("sorted", "xla"), ("sorted", "interpret")):
    y, taken, macs, _ = _apply(module.clone(compute=compute, impl=impl), p, x, routes=routes)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(taken, routes)
    np.testing.assert_array_equal(macs, want_macs)
  masked = module.clone(mix=(0.2, 0.3, 0.5), mix_exact=True)
  want = _duo_grad(masked, p, _x((2, 16, D)))
  got = _duo_grad(masked.clone(compute="sorted", impl="xla"), p, _x((2, 16, D)))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_block_hands_the_gated_and_bias_options_to_duo():
  """DecoderConfig.ffn_gated / mlp_bias reach DuoFFN through the block (no refusal)."""
  cfg = dataclasses.replace(CFG, activation="silu", ffn_gated=True, mlp_bias=True)
  ids = jax.random.randint(jax.random.key(1), (B, T), 0, 40)
  p = _params(DecoderLM(cfg), ids)["blocks"]["ffn"]
  assert {"wi_gate", "bi", "bi_gate", "bo", "wi_gate_small", "bo_small"} <= set(p)
  assert p["wi_gate"].shape == (CFG.num_layers, CFG.d_model, CFG.d_ff)
