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
  * Difficulty of a token (the one definition, here and in the report): its loss under the
    all-SMALL pattern minus its oracle loss, the loss reduction routing can buy over the small
    model. All-SMALL, not the cheapest pattern (all SKIP, no FFN at all): the all-SKIP loss
    mostly measures what the FFNs are worth, not how much a token gains from more compute.
    It is >= 0 whenever all-SMALL is in the searched set (every budget includes it).

For spaces too large to enumerate (3^12 = 531441 patterns for the paper's 12 layers),
`local_search` runs a per-token local search (every token its own descent, the candidate
patterns evaluated in batches shared by all tokens), and `random_patterns` draws the "random
routing at the same budget" baseline.
"""
import functools
import itertools
import math
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layers.duo import BIG, SKIP, SMALL
from layers.mlp import ffn_macs

MAX_PATTERNS = 100_000

Progress = Optional[Callable[[int, int], None]]
# patterns int [p, L] -> per-token losses float [p, b, t] (e.g. pattern_token_losses on a batch)
Evaluate = Callable[[np.ndarray], np.ndarray]


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
    ValueError: if P > limit (the count is computed before enumerating); use `local_search` or
      `random_patterns` for such budgets.
  """
  if num_layers < 1 or max_big < 0 or (max_small is not None and max_small < 0):
    raise ValueError(f"Need num_layers >= 1 and non-negative budgets; got num_layers="
                     f"{num_layers}, max_big={max_big}, max_small={max_small}.")
  count = _count_within_budget(num_layers, max_big, max_small, allow_skip)
  if count > limit:
    raise ValueError(
        f"{count} patterns for num_layers={num_layers}, max_big={max_big}, max_small="
        f"{max_small}, allow_skip={allow_skip} exceed the limit of {limit}; use local_search "
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


def all_small_index(patterns) -> int:
  """Index of the all-SMALL pattern in patterns [P, L] (the difficulty's reference)."""
  hits = np.flatnonzero((np.asarray(patterns) == SMALL).all(axis=1))
  if hits.size == 0:
    raise ValueError("The patterns do not include all-SMALL, the reference of difficulty; add "
                     "it (every budget's enumeration and local_search include it).")
  return int(hits[0])


def oracle(losses, patterns, weights, macs) -> dict:
  """The best pattern per token and what it says about compute.

  Args:
    losses: float [P, b, t] from `pattern_token_losses`.
    patterns: int [P, L], the patterns the losses belong to.
    weights: [b, t]; tokens with weight 0 (padding) are left out of means and counts.
    macs: [P] cost of each pattern, from `pattern_macs`.

  Returns a dict of numpy arrays:
    best: int [b, t], argmin_p losses[p] (first on ties); oracle_loss: [b, t], its loss;
    mean_oracle_loss: sum(w * oracle_loss) / sum(w);
    pattern_mean_loss: [P], each pattern's weighted mean loss (the oracle's mean is <= each);
    big_counts: int [L], weighted tokens whose best pattern is BIG at layer l;
    big_fraction: [L], big_counts / number of weighted tokens;
    big_layers_by_position: [t], the weighted mean number of BIG layers in the best patterns of
      the tokens at each sequence position (nan where a position has no weighted token);
    reference: index of the all-SMALL pattern; difficulty: [b, t], losses[reference] -
      oracle_loss (the module docstring's definition);
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
  reference = all_small_index(patterns)
  per_column = weights.sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    by_position = (big.sum(-1) * weights).sum(axis=0) / per_column
  return {
      "best": best,
      "oracle_loss": oracle_loss,
      "mean_oracle_loss": float(_weighted_mean(oracle_loss, weights)),
      "pattern_mean_loss": _weighted_mean(losses, weights),
      "big_counts": big_counts,
      "big_fraction": big_counts / max(int(counted.sum()), 1),
      "big_layers_by_position": np.where(per_column > 0, by_position, np.nan),
      "reference": reference,
      "difficulty": losses[reference] - oracle_loss,
      "mean_oracle_macs": float(_weighted_mean(np.asarray(macs, np.float64)[best], weights)),
  }


def neighbours(pattern: Sequence[int], max_big: int, allow_skip: bool = True) -> set:
  """The patterns one move from `pattern` with <= max_big BIG layers, as tuples.

  A move changes one layer's route, or moves BIG from one layer to another (the vacated layer
  SMALL, or SKIP if allowed): under a BIG budget that is full, a single change cannot move BIG
  without first making the loss worse.
  """
  pattern = tuple(int(r) for r in pattern)
  routes = (SKIP, SMALL, BIG) if allow_skip else (SMALL, BIG)
  num_big = pattern.count(BIG)
  out = set()
  for l, route in enumerate(pattern):
    for r in routes:
      if r != route and (r != BIG or num_big < max_big):
        out.add(pattern[:l] + (r,) + pattern[l + 1:])
  bigs = [l for l, r in enumerate(pattern) if r == BIG]
  for a in bigs:
    for b in (l for l, r in enumerate(pattern) if r != BIG):
      for r in routes[:-1]:
        q = list(pattern)
        q[a], q[b] = r, BIG
        out.add(tuple(q))
  out.discard(pattern)
  return out


def local_search(evaluate: Evaluate, num_layers: int, weights,
                 budgets: Optional[Iterable[int]] = None, *, start=None, per_round: int = 64,
                 max_patterns: int = 2048, allow_skip: bool = True,
                 progress: Progress = None) -> dict:
  """Per-token local search for the oracle pattern, for spaces too large to enumerate.

  Every token, for every budget k in `budgets` (at most k BIG layers; default 0..L), descends on
  its own loss: from its best evaluated pattern within the budget it proposes every pattern one
  move away (`neighbours`). A round evaluates, in one batch through `evaluate` (vmapped over
  patterns: pattern_token_losses), the `per_round` proposals backed by the most weighted tokens
  (ties: lexicographic), and each token then takes its best evaluated pattern. The search stops
  when no token has an unevaluated neighbour, a local optimum for every token and budget (a
  global one when losses add over layers: tested), or after `max_patterns` evaluations. The
  pattern set is shared, so a token whose proposals no other token backs may stop early: the
  price of batching, measured against the exhaustive oracle on the method page.

  Args:
    evaluate: patterns int [p, L] -> float [p, b, t], per-token losses under each pattern (the
      whole sequence routed by it: the module docstring's context convention).
    weights: [b, t]; tokens of weight 0 do not vote.
    start: optional int [s, L] patterns evaluated first (with all SMALL, all BIG and, when
      allowed, all SKIP).

  Returns:
    patterns int32 [P, L] (in evaluation order), losses float32 [P, b, t], rounds (int),
    converged (bool: no proposal left).
  """
  budgets = sorted(set(range(num_layers + 1) if budgets is None else budgets))
  w = np.asarray(weights, np.float64)
  counted = w > 0
  seen, patterns, losses = {}, [], []
  best = {}  # budget -> (value [b, t], index [b, t])

  def add(new):
    new = [p for p in dict.fromkeys(tuple(int(r) for r in p) for p in new) if p not in seen]
    if not new:
      return
    got = np.asarray(evaluate(np.asarray(new, np.int32)), np.float32)
    offset = len(patterns)
    for i, p in enumerate(new):
      seen[p] = offset + i
    patterns.extend(new)
    losses.append(got)
    num_big = np.asarray([p.count(BIG) for p in new])
    for k in budgets:
      sel = np.flatnonzero(num_big <= k)
      if not sel.size:
        continue
      value, index = got[sel].min(axis=0), offset + sel[got[sel].argmin(axis=0)]
      if k in best:
        # Strictly better only: the earlier pattern wins ties, like argmin.
        keep = best[k][0] <= value
        value, index = np.where(keep, best[k][0], value), np.where(keep, best[k][1], index)
      best[k] = (value, index)

  anchors = [(SMALL,) * num_layers, (BIG,) * num_layers] + (
      [(SKIP,) * num_layers] if allow_skip else [])
  add(anchors + ([] if start is None else [tuple(p) for p in np.asarray(start)]))
  rounds, converged = 0, False
  while len(patterns) < max_patterns:
    votes = {}
    for k in budgets:
      if k not in best:
        continue
      ids, inverse = np.unique(best[k][1][counted], return_inverse=True)
      support = np.bincount(inverse, weights=w[counted])
      for i, v in zip(ids, support):
        for q in neighbours(patterns[i], k, allow_skip):
          if q not in seen:
            votes[q] = votes.get(q, 0.0) + v
    if not votes:
      converged = True
      break
    room = min(per_round, max_patterns - len(patterns))
    add(sorted(votes, key=lambda q: (-votes[q], q))[:room])
    rounds += 1
    if progress is not None:
      progress(len(patterns), max_patterns)
  return {"patterns": np.asarray(patterns, np.int32), "losses": np.concatenate(losses),
          "rounds": rounds, "converged": converged}


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
