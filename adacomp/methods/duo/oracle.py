"""Oracle routing for Duo-LLM: which routing pattern over layers is best for each token.

Duo-LLM (arXiv 2410.10846) asks, for a model trained with random routes (so that every pattern is
a valid model), which route per layer each token would take if an oracle chose it under a compute
budget. This module holds the search core; routes are `layers.duo`'s SKIP=0, SMALL=1, BIG=2.

Definitions:
  * A pattern is one route per layer, int [L].
  * Context routing (our choice): under a pattern the WHOLE sequence uses it, every token at
    layer l takes pattern[l], so a token's context (the keys and values it attends to) was
    computed with the same pattern as the token. The paper also allows fixing the context on a
    reference route and varying only the token under study. We take the simpler choice because
    one forward pass per pattern then gives the loss of every token of the batch under that
    pattern, the passes batch over patterns with vmap, and no KV-cache bookkeeping (a cache
    filled on the reference route, one decoding step per token and pattern) is needed. The price:
    a token's oracle pattern also chooses its context's compute, so oracle losses are lower
    bounds on what a per-token router with a fixed context could reach.
  * Budget: at most `max_big` BIG layers (and at most `max_small` SMALL ones), SKIP optionally
    allowed; `patterns_within_budget` enumerates the set.
  * Oracle: for token (i, j), best = argmin_p loss[p, i, j] over the patterns of the set, the
    loss being the cross-entropy (nats) of batch['targets'][i, j] under pattern p.
  * Cost: per-token FFN MACs of a pattern, sum_l 2 * d_model * width(pattern[l]), with width 0
    (SKIP), d_ff_small (SMALL) or d_ff (BIG): what DuoFFN sows as `macs`. Attention and the
    router are the same for every pattern and left out.
  * Difficulty of a token: loss under the cheapest pattern of the set minus its oracle loss, the
    loss reduction that extra compute can buy for it (>= 0, since the cheapest is in the set).

For spaces too large to enumerate (3^12 = 531441 patterns for the paper's 12 layers),
`greedy_search` adds BIG layers one at a time on the batch mean loss, and `random_patterns` draws
the "random routing at the same budget" baseline.
"""
import functools
import itertools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layers.duo import BIG, SKIP, SMALL
from layers.mlp import ffn_macs

MAX_PATTERNS = 100_000

Progress = Optional[Callable[[int, int], None]]


def _count_within_budget(num_layers, max_big, max_small, allow_skip):
  """Number of patterns: sum_k C(L, k) * (sum_{s <= max_small} C(L-k, s) or [L-k <= max_small])."""
  total = 0
  for k in range(min(max_big, num_layers) + 1):
    rest = num_layers - k
    small_cap = rest if max_small is None else min(max_small, rest)
    if allow_skip:
      total += math.comb(num_layers, k) * sum(math.comb(rest, s) for s in range(small_cap + 1))
    elif rest <= small_cap:
      total += math.comb(num_layers, k)
  return total


def patterns_within_budget(num_layers: int, max_big: int, max_small: Optional[int] = None,
                           allow_skip: bool = True, limit: int = MAX_PATTERNS) -> np.ndarray:
  """Every pattern with <= max_big BIG layers (and <= max_small SMALL ones, if given).

  Without `allow_skip` every non-BIG layer is SMALL. Patterns come ordered by the number of BIG
  layers, then by the BIG and SMALL positions (itertools.combinations order); each appears once.

  Returns:
    int32 [P, num_layers].

  Raises:
    ValueError: if P > limit (the count is computed before enumerating); use `greedy_search` or
      `random_patterns` for such budgets.
  """
  if num_layers < 1 or max_big < 0 or (max_small is not None and max_small < 0):
    raise ValueError(f"Need num_layers >= 1 and non-negative budgets; got num_layers="
                     f"{num_layers}, max_big={max_big}, max_small={max_small}.")
  count = _count_within_budget(num_layers, max_big, max_small, allow_skip)
  if count > limit:
    raise ValueError(
        f"{count} patterns for num_layers={num_layers}, max_big={max_big}, max_small="
        f"{max_small}, allow_skip={allow_skip} exceed the limit of {limit}; use greedy_search "
        f"(or random_patterns) for a space this large, or raise `limit`.")
  if count == 0:
    raise ValueError(f"No pattern fits: without SKIP, {num_layers} layers need "
                     f"max_big + max_small >= {num_layers}; got {max_big} + {max_small}.")
  layers = range(num_layers)
  patterns = []
  for k in range(min(max_big, num_layers) + 1):
    for big in itertools.combinations(layers, k):
      rest = [l for l in layers if l not in big]
      small_cap = len(rest) if max_small is None else min(max_small, len(rest))
      sizes = range(small_cap + 1) if allow_skip else ([len(rest)] if len(rest) <= small_cap
                                                       else [])
      for s in sizes:
        for small in itertools.combinations(rest, s):
          pattern = np.full(num_layers, SKIP, np.int32)
          pattern[list(small)] = SMALL
          pattern[list(big)] = BIG
          patterns.append(pattern)
  return np.stack(patterns)


def pattern_macs(patterns, d_model: int, d_ff: int, d_ff_small: int) -> np.ndarray:
  """Per-token FFN MACs of each pattern: sum_l 2 * d_model * width(pattern[l]); int64 [P]."""
  per_layer = np.zeros(3, np.int64)
  per_layer[SMALL], per_layer[BIG] = ffn_macs(d_model, d_ff_small), ffn_macs(d_model, d_ff)
  return per_layer[np.asarray(patterns)].sum(axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _chunk_losses(model, params, inputs, targets, patterns):
  """float32 [p, b, t]: cross-entropy of targets, routes [L, b, t] broadcast from each pattern."""
  b, t = inputs.shape

  def one(pattern):
    routes = jnp.broadcast_to(pattern[:, None, None], (pattern.shape[0], b, t))
    logits = model.apply({"params": params}, inputs, routes=routes)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)

  return jax.vmap(one)(patterns)


def pattern_token_losses(model, params, batch: dict, patterns, chunk: int = 16,
                         progress: Progress = None) -> np.ndarray:
  """Per-token cross-entropy (nats) of batch['targets'] under each pattern.

  model: a `DecoderLM` whose FFNs take imposed routes (DuoFFN); params: its `params` tree;
  batch: 'inputs' and 'targets' int [b, t]. Patterns go through the model `chunk` at a time
  (vmapped, one compiled shape: the last chunk is padded with copies of its last pattern);
  memory grows as chunk * b * t * vocab. `progress(done, total)` is called after each chunk
  with the number of patterns done.

  Returns:
    float32 [P, b, t].
  """
  patterns = np.asarray(patterns, np.int32)
  if patterns.ndim != 2:
    raise ValueError(f"patterns must be int [P, num_layers]; got shape {patterns.shape}.")
  total = patterns.shape[0]
  inputs, targets = jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])
  out = []
  for start in range(0, total, chunk):
    part = patterns[start:start + chunk]
    n = part.shape[0]
    padded = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
    out.append(np.asarray(_chunk_losses(model, params, inputs, targets, padded))[:n])
    if progress is not None:
      progress(start + n, total)
  return np.concatenate(out)


def _weighted_mean(losses, weights):
  """sum(w * loss) / sum(w) over the last two axes (b, t)."""
  w = np.asarray(weights, np.float64)
  return (np.asarray(losses, np.float64) * w).sum(axis=(-2, -1)) / max(w.sum(), 1e-12)


def oracle(losses, patterns, weights, macs) -> dict:
  """The best pattern per token and what it says about compute.

  Args:
    losses: float [P, b, t] from `pattern_token_losses`.
    patterns: int [P, L], the patterns the losses belong to.
    weights: [b, t]; tokens with weight 0 (padding) are left out of means and counts.
    macs: [P] cost of each pattern, from `pattern_macs`; "cheapest" is argmin macs (the first
      such pattern on ties).

  Returns a dict of numpy arrays:
    best: int [b, t], argmin_p losses[p] (first on ties); oracle_loss: [b, t], its loss;
    mean_oracle_loss: sum(w * oracle_loss) / sum(w);
    pattern_mean_loss: [P], each pattern's weighted mean loss (the oracle's mean is <= each);
    big_counts: int [L], weighted tokens whose best pattern is BIG at layer l;
    big_fraction: [L], big_counts / number of weighted tokens;
    cheapest: index of the cheapest pattern; difficulty: [b, t],
      losses[cheapest] - oracle_loss, the loss reduction available from extra compute;
    mean_oracle_macs: sum(w * macs[best]) / sum(w).
  """
  losses = np.asarray(losses, np.float32)
  patterns = np.asarray(patterns)
  weights = np.asarray(weights, np.float32)
  best = np.argmin(losses, axis=0)
  oracle_loss = np.take_along_axis(losses, best[None], axis=0)[0]
  counted = weights > 0
  big = (patterns[best] == BIG) & counted[..., None]  # [b, t, L]
  big_counts = big.sum(axis=(0, 1))
  cheapest = int(np.argmin(np.asarray(macs)))
  return {
      "best": best,
      "oracle_loss": oracle_loss,
      "mean_oracle_loss": float(_weighted_mean(oracle_loss, weights)),
      "pattern_mean_loss": _weighted_mean(losses, weights),
      "big_counts": big_counts,
      "big_fraction": big_counts / max(int(counted.sum()), 1),
      "cheapest": cheapest,
      "difficulty": losses[cheapest] - oracle_loss,
      "mean_oracle_macs": float(_weighted_mean(np.asarray(macs, np.float64)[best], weights)),
  }


def greedy_search(model, params, batch: dict, num_layers: int, max_big: int,
                  start_route: int = SMALL, chunk: int = 16, progress: Progress = None) -> dict:
  """Greedy BIG placement on the batch mean loss, for spaces too large to enumerate.

  Starts from every layer on `start_route`; step k (k = 1..max_big) tries BIG in each layer not
  yet BIG and keeps the one with the lowest weighted mean loss over the batch's tokens
  (sum(w * loss) / sum(w), one pattern for the whole batch, not per token). A step always adds a
  layer, even when no candidate lowers the loss, so the result traces loss against budget.
  `progress(step, max_big)` is called after each step.

  Returns:
    patterns: int32 [max_big + 1, L], the start and the pattern after each step;
    losses: float [max_big + 1], their mean losses; order: int [max_big], the layers made BIG.
  """
  if not 0 <= max_big <= num_layers:
    raise ValueError(f"max_big must lie in [0, num_layers={num_layers}]; got {max_big}.")
  weights = batch["weights"]
  current = np.full(num_layers, start_route, np.int32)
  patterns = [current]
  losses = [_weighted_mean(pattern_token_losses(model, params, batch, current[None], chunk)[0],
                           weights)]
  order = []
  for step in range(max_big):
    layers = [l for l in range(num_layers) if current[l] != BIG]
    candidates = np.repeat(current[None], len(layers), axis=0)
    candidates[np.arange(len(layers)), layers] = BIG
    means = _weighted_mean(pattern_token_losses(model, params, batch, candidates, chunk),
                           weights)
    i = int(np.argmin(means))
    current = candidates[i]
    patterns.append(current)
    losses.append(means[i])
    order.append(layers[i])
    if progress is not None:
      progress(step + 1, max_big)
  return {"patterns": np.stack(patterns), "losses": np.asarray(losses),
          "order": np.asarray(order, np.int32)}


def random_patterns(num_layers: int, n: int, max_big: int, rng) -> np.ndarray:
  """n random patterns, each with exactly max_big BIG layers (uniform subset) and SMALL elsewhere.

  The "random routing at the same budget" baseline. Draws are independent (a pattern may repeat).
  rng: a np.random.Generator or a seed; the same seed gives the same patterns.

  Returns:
    int32 [n, num_layers].
  """
  if not 0 <= max_big <= num_layers:
    raise ValueError(f"max_big must lie in [0, num_layers={num_layers}]; got {max_big}.")
  rng = np.random.default_rng(rng)
  big = np.argsort(rng.random((n, num_layers)), axis=1)[:, :max_big]
  patterns = np.full((n, num_layers), SMALL, np.int32)
  np.put_along_axis(patterns, big, BIG, axis=1)
  return patterns
