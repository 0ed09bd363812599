"""Duo-LLM oracle routing search (adacomp.methods.duo.oracle): tiny models, hand-made losses."""
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adacomp.methods.duo import oracle as oracle_lib
from adacomp.models.decoder import DecoderConfig, DecoderLM
from layers.duo import BIG, SKIP, SMALL, DuoFFN

L, B, T, V, D, F, F_SMALL = 3, 2, 8, 40, 16, 32, 8
TARGET = 7  # the token every position must predict in the constructed case
USEFUL = 1  # the only layer whose big FFN helps in the constructed case

CFG = DecoderConfig(vocab_size=V, num_layers=L, d_model=D, num_heads=2, head_dim=8, d_ff=F,
                    max_len=16, ffn_cls=functools.partial(DuoFFN, d_ff_small=F_SMALL))


@pytest.fixture(scope="module", name="model")
def _model():
  return DecoderLM(CFG)


@pytest.fixture(scope="module", name="batch")
def _batch():
  ids = np.random.default_rng(0).integers(0, V, (B, T + 1)).astype(np.int32)
  weights = np.ones((B, T), np.float32)
  weights[1, -1] = 0.0  # one padded token, left out of means and counts
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": weights}


@pytest.fixture(scope="module", name="params")
def _params(model, batch):
  init = jax.jit(model.init)
  return nn.meta.unbox(init(jax.random.key(0), jnp.asarray(batch["inputs"]))["params"])


@pytest.fixture(scope="module", name="constructed")
def _constructed(params, batch):
  """Params and batch where BIG in layer USEFUL, and only there, predicts the targets well.

  Every target is TARGET. Layer USEFUL's big FFN gets W_in = [U, -U] (pairs of opposite
  columns, so sum_f gelu(h_f) = sum_pairs z (2 Phi(z) - 1) > 0 for every input) and
  W_out = alpha * 1 e_TARGET^T: its output is a large positive multiple of TARGET's (tied)
  embedding, which swamps the residual stream; a sharp final norm turns that into a confident,
  correct prediction. The other layers keep their random weights.
  """
  u = np.asarray(jax.random.normal(jax.random.key(3), (D, F // 2)))
  ffn = dict(params["blocks"]["ffn"])
  ffn["wi"] = ffn["wi"].at[USEFUL].set(np.concatenate([u, -u], axis=1))
  e = params["embed"]["embedding"][TARGET]
  ffn["wo"] = ffn["wo"].at[USEFUL].set(100.0 * jnp.ones((F, 1)) * e[None, :])
  new = {**params, "blocks": {**params["blocks"], "ffn": ffn},
         "final_norm": {"scale": 10.0 * params["final_norm"]["scale"]}}
  return new, {**batch, "targets": np.full((B, T), TARGET, np.int32)}


def _expected_count(num_layers, max_big, max_small=None, allow_skip=True):
  """Patterns with k BIG, s SMALL and the rest SKIP: L! / (k! s! (L-k-s)!), summed in budget."""
  total = 0
  for k in range(max_big + 1):
    for s in range(num_layers - k + 1):
      skips = num_layers - k - s
      if (max_small is not None and s > max_small) or (skips and not allow_skip):
        continue
      total += math.factorial(num_layers) // (
          math.factorial(k) * math.factorial(s) * math.factorial(skips))
  return total


@pytest.mark.parametrize("num_layers,max_big,max_small,allow_skip", [
    (4, 1, None, True), (4, 2, 1, True), (5, 2, None, False), (3, 3, None, True),
    (4, 0, 2, True), (4, 1, 3, False)])
def test_patterns_within_budget_enumerates_the_budget_once(num_layers, max_big, max_small,
                                                           allow_skip):
  got = oracle_lib.patterns_within_budget(num_layers, max_big, max_small, allow_skip)
  assert got.shape == (_expected_count(num_layers, max_big, max_small, allow_skip), num_layers)
  assert len({tuple(p) for p in got}) == len(got)
  assert np.all((got == BIG).sum(1) <= max_big)
  if max_small is not None:
    assert np.all((got == SMALL).sum(1) <= max_small)
  if not allow_skip:
    assert not np.any(got == SKIP)
  assert set(np.unique(got)) <= {SKIP, SMALL, BIG}


def test_patterns_within_budget_counts_like_the_formula_and_brute_force():
  got = oracle_lib.patterns_within_budget(4, 1)
  assert len(got) == sum(math.comb(4, k) * 2 ** (4 - k) for k in range(2)) == 48
  brute = {p for p in itertools.product((SKIP, SMALL, BIG), repeat=4) if p.count(BIG) <= 1}
  assert {tuple(p) for p in got} == brute


def test_patterns_within_budget_refuses_huge_spaces_and_points_to_the_local_search():
  with pytest.raises(ValueError, match="local_search"):
    oracle_lib.patterns_within_budget(12, 12)  # 3^12 = 531441 patterns
  with pytest.raises(ValueError, match="No pattern"):
    oracle_lib.patterns_within_budget(4, 1, max_small=2, allow_skip=False)


def test_pattern_macs_sums_layer_widths():
  patterns = np.array([[SKIP, SMALL, BIG], [BIG, BIG, BIG], [SKIP, SKIP, SKIP]])
  np.testing.assert_array_equal(oracle_lib.pattern_macs(patterns, D, F, F_SMALL),
                                [2 * D * (F_SMALL + F), 2 * D * 3 * F, 0])


def test_pattern_token_losses_match_a_direct_forward_pass(model, params, batch):
  patterns = np.array([[SMALL, BIG, SKIP], [BIG, BIG, BIG], [SKIP, SMALL, SMALL]], np.int32)
  calls = []
  got = oracle_lib.pattern_token_losses(model, params, batch, patterns, chunk=2,
                                        progress=lambda done, total: calls.append((done, total)))
  assert got.shape == (3, B, T) and got.dtype == np.float32
  assert calls == [(2, 3), (3, 3)]
  for p, pattern in enumerate(patterns):
    routes = np.broadcast_to(pattern[:, None, None], (L, B, T))
    logits = model.apply({"params": params}, batch["inputs"], routes=routes)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    np.testing.assert_allclose(got[p], want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got[0], got[1])


def test_oracle_picks_the_known_best_pattern_from_hand_made_losses():
  patterns = np.array([[SMALL, SMALL], [BIG, SMALL], [SMALL, BIG], [SKIP, SKIP]], np.int32)
  macs = oracle_lib.pattern_macs(patterns, 4, 16, 4)
  # Token (0, 0) is best with BIG in layer 0, (0, 1) with BIG in layer 1, (1, 0) with all
  # SMALL, (1, 1) (weight 0) would be best with BIG in layer 0.
  losses = np.array([
      [[2.0, 2.0], [1.0, 5.0]],
      [[0.5, 3.0], [1.5, 0.1]],
      [[1.0, 0.2], [1.2, 4.0]],
      [[3.0, 3.0], [2.0, 6.0]],
  ], np.float32)
  weights = np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)
  got = oracle_lib.oracle(losses, patterns, weights, macs)
  np.testing.assert_array_equal(got["best"], [[1, 2], [0, 1]])
  np.testing.assert_allclose(got["oracle_loss"], [[0.5, 0.2], [1.0, 0.1]])
  assert got["mean_oracle_loss"] == pytest.approx((0.5 + 0.2 + 1.0) / 3)
  np.testing.assert_allclose(got["pattern_mean_loss"],
                             [5.0 / 3, 5.0 / 3, 2.4 / 3, 8.0 / 3], rtol=1e-6)
  np.testing.assert_array_equal(got["big_counts"], [1, 1])
  np.testing.assert_allclose(got["big_fraction"], [1 / 3, 1 / 3])
  # Position 0: tokens (0, 0) (one BIG layer) and (1, 0) (none); position 1: (0, 1) only.
  np.testing.assert_allclose(got["big_layers_by_position"], [0.5, 1.0])
  assert got["reference"] == 0  # all SMALL, the difficulty's reference (not all SKIP)
  np.testing.assert_allclose(got["difficulty"], [[1.5, 1.8], [0.0, 4.9]], rtol=1e-6)
  assert got["mean_oracle_macs"] == pytest.approx(np.mean([macs[1], macs[2], macs[0]]))


def test_oracle_on_a_model_puts_big_in_the_only_useful_layer(model, constructed):
  params, batch = constructed
  patterns = oracle_lib.patterns_within_budget(L, 1)
  losses = oracle_lib.pattern_token_losses(model, params, batch, patterns, chunk=8)
  got = oracle_lib.oracle(losses, patterns, batch["weights"],
                          oracle_lib.pattern_macs(patterns, D, F, F_SMALL))
  assert np.all(patterns[got["best"]][..., USEFUL] == BIG)
  want_counts = np.zeros(L, int)
  want_counts[USEFUL] = B * T - 1  # every weighted token
  np.testing.assert_array_equal(got["big_counts"], want_counts)
  # Difficulty against an independent forward pass of the all-SMALL route.
  logits = model.apply({"params": params}, batch["inputs"],
                       routes=np.full((L, B, T), SMALL, np.int32))
  small = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  np.testing.assert_allclose(got["difficulty"], small - got["oracle_loss"], rtol=1e-5, atol=1e-5)


def _exhaustive_best(patterns, losses, max_big):
  """Per-token minimum over the patterns with <= max_big BIG layers, by brute force."""
  ok = (np.asarray(patterns) == BIG).sum(1) <= max_big
  return np.asarray(losses)[ok].min(axis=0)


def test_neighbours_are_one_route_change_or_one_big_move_within_the_budget():
  for pattern, max_big in (((SKIP, SMALL, BIG, SMALL), 1), ((BIG, SMALL, BIG, SKIP), 3),
                           ((SMALL,) * 4, 0)):
    want = set()
    for q in itertools.product((SKIP, SMALL, BIG), repeat=4):
      if q.count(BIG) > max_big or q == pattern:
        continue
      changed = [l for l in range(4) if q[l] != pattern[l]]
      moved = (len(changed) == 2 and sorted([pattern[l] == BIG for l in changed]) == [False, True]
               and sorted([q[l] == BIG for l in changed]) == [False, True])
      if len(changed) == 1 or moved:
        want.add(q)
    assert oracle_lib.neighbours(pattern, max_big) == want, pattern


def test_local_search_finds_the_exhaustive_oracle_when_losses_add_over_layers():
  """Loss = sum over layers of a per-token cost of the layer's route: the optimum under a BIG
  budget k is BIG where it gains most. BIG gains a lot everywhere and each search starts with
  BIG in the first k layers, so a token whose best layers lie elsewhere must move BIG there."""
  num_layers, b, t = 5, 3, 4
  cost = np.random.default_rng(0).normal(size=(num_layers, 3, b, t))
  cost[:, BIG] -= 10.0
  evaluate = lambda pats: np.stack([sum(cost[l, p[l]] for l in range(num_layers)) for p in pats])
  everything = oracle_lib.patterns_within_budget(num_layers, num_layers)
  table = evaluate(everything)
  for k in range(num_layers + 1):
    start = np.full((1, num_layers), SMALL, np.int32)
    start[0, :k] = BIG
    got = oracle_lib.local_search(evaluate, num_layers, np.ones((b, t)), budgets=[k],
                                  start=start, per_round=10_000, max_patterns=10_000)
    assert got["converged"]
    np.testing.assert_allclose(_exhaustive_best(got["patterns"], got["losses"], k),
                               _exhaustive_best(everything, table, k), err_msg=f"budget {k}")
    assert len(got["patterns"]) < len(everything)  # it did not just enumerate


def test_local_search_on_a_model_finds_the_exhaustive_oracle(model, constructed):
  params, batch = constructed
  evaluate = lambda pats: oracle_lib.pattern_token_losses(model, params, batch, pats, chunk=9)
  got = oracle_lib.local_search(evaluate, L, batch["weights"], per_round=9, max_patterns=27)
  everything = oracle_lib.patterns_within_budget(L, L)
  table = oracle_lib.pattern_token_losses(model, params, batch, everything, chunk=9)
  for k in range(L + 1):
    np.testing.assert_allclose(_exhaustive_best(got["patterns"], got["losses"], k),
                               _exhaustive_best(everything, table, k), rtol=1e-6, atol=1e-6)
  best = oracle_lib.oracle(got["losses"], got["patterns"], batch["weights"],
                           oracle_lib.pattern_macs(got["patterns"], D, F, F_SMALL))["best"]
  assert np.all(got["patterns"][best][..., USEFUL] == BIG)


def test_local_search_evaluates_batches_of_new_patterns_up_to_its_cap():
  num_layers, b, t = 6, 2, 3
  cost = np.random.default_rng(1).normal(size=(num_layers, 3, b, t))
  calls = []

  def evaluate(pats):
    calls.append(len(pats))
    return np.stack([sum(cost[l, p[l]] for l in range(num_layers)) for p in pats])

  start = np.array([[BIG, SKIP, SMALL, SMALL, BIG, SKIP]], np.int32)
  got = oracle_lib.local_search(evaluate, num_layers, np.ones((b, t)), budgets=[2],
                                start=start, per_round=10, max_patterns=45)
  assert len(got["patterns"]) == sum(calls) == 45 and not got["converged"]
  assert calls[0] == 4 and all(n <= 10 for n in calls[1:])  # 3 anchors + the start
  assert len({tuple(p) for p in got["patterns"]}) == 45
  np.testing.assert_array_equal(got["patterns"][:4], [[SMALL] * 6, [BIG] * 6, [SKIP] * 6,
                                                      start[0]])
  for p, loss in zip(got["patterns"], got["losses"]):
    np.testing.assert_allclose(loss, evaluate(p[None])[0])
  # Only budget 2 was searched: no proposal beyond 2 BIG layers (the anchors aside).
  assert np.all((got["patterns"][4:] == BIG).sum(1) <= 2)


def test_random_patterns_respect_the_budget_and_repeat_per_seed():
  got = oracle_lib.random_patterns(6, 50, 2, np.random.default_rng(0))
  assert got.shape == (50, 6)
  assert np.all((got == BIG).sum(1) == 2) and np.all((got == SMALL).sum(1) == 4)
  np.testing.assert_array_equal(got, oracle_lib.random_patterns(6, 50, 2, 0))
  assert len({tuple(p) for p in got}) > 1
  assert not np.array_equal(got, oracle_lib.random_patterns(6, 50, 2, 1))
