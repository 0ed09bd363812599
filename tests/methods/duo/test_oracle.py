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


def test_patterns_within_budget_refuses_huge_spaces_and_points_to_greedy():
  with pytest.raises(ValueError, match="greedy_search"):
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
  assert np.all(got["mean_oracle_loss"] <= got["pattern_mean_loss"])
  np.testing.assert_array_equal(got["big_counts"], [1, 1])
  np.testing.assert_allclose(got["big_fraction"], [1 / 3, 1 / 3])
  assert got["cheapest"] == 3  # all SKIP
  np.testing.assert_allclose(got["difficulty"], [[2.5, 2.8], [1.0, 5.9]], rtol=1e-6)
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
  assert np.all(got["mean_oracle_loss"] <= got["pattern_mean_loss"])
  assert np.all(got["difficulty"] >= 0)


def test_greedy_search_makes_the_useful_layer_big_first(model, constructed):
  params, batch = constructed
  steps = []
  got = oracle_lib.greedy_search(model, params, batch, L, 2,
                                 progress=lambda step, total: steps.append(step))
  assert got["order"][0] == USEFUL
  np.testing.assert_array_equal(got["patterns"][0], [SMALL] * L)
  want = np.full(L, SMALL)
  want[USEFUL] = BIG
  np.testing.assert_array_equal(got["patterns"][1], want)
  assert (got["patterns"][2] == BIG).sum() == 2 and got["patterns"][2][USEFUL] == BIG
  assert got["losses"][1] < got["losses"][0] - 1.0
  assert steps == [1, 2]
  # The losses are the batch means of the chosen patterns.
  direct = oracle_lib.pattern_token_losses(model, params, batch, got["patterns"])
  w = batch["weights"]
  np.testing.assert_allclose(got["losses"], (direct * w).sum((1, 2)) / w.sum(), rtol=1e-5)


def test_random_patterns_respect_the_budget_and_repeat_per_seed():
  got = oracle_lib.random_patterns(6, 50, 2, np.random.default_rng(0))
  assert got.shape == (50, 6)
  assert np.all((got == BIG).sum(1) == 2) and np.all((got == SMALL).sum(1) == 4)
  np.testing.assert_array_equal(got, oracle_lib.random_patterns(6, 50, 2, 0))
  assert len({tuple(p) for p in got}) > 1
  assert not np.array_equal(got, oracle_lib.random_patterns(6, 50, 2, 1))
