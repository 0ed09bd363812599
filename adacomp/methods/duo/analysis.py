"""Duo-LLM routing analysis: oracle vs trained routers vs random and uniform routing.

`run_analysis` loads a Duo checkpoint (a model trained with random routes, `configs/duo.gin`),
takes held-out batches, computes every token's loss under the routing patterns (all 3^L of them
when they fit, L <= 10; otherwise the patterns `oracle.local_search` visits, a per-token local
search) and reports, for each budget k = 0..L (at most k BIG layers per token):

  * oracle: each token its best pattern with <= k BIG layers, the other layers SMALL or SKIP
    (see `adacomp.methods.duo.oracle` for the context convention: a pattern is applied to the whole
    sequence, so oracle losses are lower bounds for a router with a fixed context); with the
    local search, the best among the visited patterns (an upper bound on the exhaustive one);
  * best static: the one pattern with <= k BIG layers that is best on average, for every token;
  * random, random_best: N random routings (the paper's "random trials"), each one pattern with
    exactly k BIG layers (a uniform subset) and SMALL elsewhere, applied to every token: their
    mean and the best of the N (the paper compares routers with the best of ~100);
  * uniform (exhaustive search only): each token, at each layer independently, BIG with
    probability k / L, else SMALL (the exact expectation over the BIG/SMALL patterns);
  * trained routers (optional checkpoints of the router stage, `configs/duo_router.gin`): their
    own argmax routes on the same tokens, at the compute they actually spend, placed against
    random and oracle at the nearest whole number of BIG layers.

Compute is FFN multiply-accumulates per token relative to all-BIG (attention, embeddings and the
router are the same for every pattern and left out); quality is bits per byte of the held-out
targets. Also: how often the oracle (at the budget of one BIG layer) and each router pick BIG at
each layer, the oracle's BIG layers by sequence position, the paper's findings checked, and the
distribution of per-token difficulty (`oracle`'s one definition: loss under all-SMALL minus the
oracle loss over every searched pattern).

Outputs in `output_dir`: analysis.json, loss_vs_compute.png, big_by_layer.png, difficulty.png.
"""
import dataclasses
import json
import math
import os
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adacomp import data as data_lib
from adacomp import gin_utils
from adacomp.metrics import ProgressBar
from adacomp.methods.duo import oracle as oracle_lib
from layers.duo import BIG, SKIP, SMALL, DuoFFN
from layers.mlp import ffn_macs

ROUTE_NAMES = {SKIP: "skip", SMALL: "small", BIG: "big"}


@dataclasses.dataclass
class DuoModel:
  model: object
  params: object
  meta: dict
  step: int
  ffn: DuoFFN  # the FFN's bound attributes (mode, widths, ...)

  @property
  def num_layers(self) -> int:
    return self.model.config.num_layers

  @property
  def widths(self):
    cfg = self.model.config
    d_small = cfg.d_ff // 4 if self.ffn.d_ff_small is None else self.ffn.d_ff_small
    return cfg.d_model, cfg.d_ff, d_small


def load_duo(checkpoint_dir: str, bindings: Sequence[str] = (), step: Optional[int] = None
             ) -> DuoModel:
  """The model and params of a Duo checkpoint, rebuilt from the gin config saved with it."""
  from adacomp.models.build import load_decoder  # pylint: disable=g-import-not-at-top
  step, meta = gin_utils.parse_checkpoint_config(checkpoint_dir, step,
                                                 gin_bindings=list(bindings))
  model, params = load_decoder(checkpoint_dir, meta, step)
  ffn_cls = model.config.ffn_cls
  func = getattr(ffn_cls, "func", ffn_cls)
  if not (isinstance(func, type) and issubclass(func, DuoFFN)):
    raise ValueError(
        f"{checkpoint_dir} is not a Duo-LLM checkpoint: its FFN is {func!r}, not DuoFFN. Train "
        f"one with `python train.py --gin_file=configs/duo.gin --workdir=...`.")
  ffn = ffn_cls(d_ff=model.config.d_ff)
  return DuoModel(model, params, meta, step, ffn)


def held_out_batch(meta: dict, split: str, num_batches: int, batch_size: Optional[int] = None,
                   seq_len: Optional[int] = None) -> dict:
  """The first `num_batches` evaluation batches of `split`, stacked into one numpy batch."""
  data = data_lib.lm_dataset(split, batch_size=batch_size or meta["batch_size"],
                             seq_len=seq_len or meta["seq_len"], train=False,
                             eval_max_batches=num_batches)
  batches = list(data)
  if not batches:
    raise ValueError(f"The {split} split yielded no batches.")
  return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in
          ("inputs", "targets", "weights", "target_bytes")}


def bits_per_byte(mean_nats, batch) -> float:
  """Mean nats per weighted token -> bits per byte of the batch's targets."""
  w = np.asarray(batch["weights"], np.float64)
  tokens, nbytes = w.sum(), (np.asarray(batch["target_bytes"], np.float64) * w).sum()
  return float(mean_nats) * tokens / math.log(2.0) / max(nbytes, 1.0)


def router_run(duo: DuoModel, batch: dict, chunk_rows: int = 16) -> dict:
  """A checkpoint's own routing on the batch: per-token loss [b, t] and routes [L, b, t]."""

  @jax.jit
  def forward(params, inputs, targets):
    logits, mutables = duo.model.apply({"params": params}, inputs, mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(mutables["intermediates"]))
    routes = [v for path, vs in sorted(flat.items()) if path[-1] == "routes" for v in vs]
    routes = routes[0] if len(routes) == 1 else jnp.stack(routes)  # scanned: [L, b, t]
    return loss, routes

  losses, routes = [], []
  for start in range(0, batch["inputs"].shape[0], chunk_rows):
    sl = slice(start, start + chunk_rows)
    loss, route = forward(duo.params, batch["inputs"][sl], batch["targets"][sl])
    losses.append(np.asarray(loss))
    routes.append(np.asarray(route))
  return {"loss": np.concatenate(losses), "routes": np.concatenate(routes, axis=1)}


def _route_stats(routes, weights, widths) -> dict:
  """FFN compute fraction (vs all-BIG), mean BIG layers and per-layer route fractions."""
  d_model, d_ff, d_small = widths
  w = np.asarray(weights, np.float64)
  cost = np.zeros(3)
  cost[SMALL], cost[BIG] = ffn_macs(d_model, d_small), ffn_macs(d_model, d_ff)
  num_layers = routes.shape[0]
  per_token = cost[routes].sum(axis=0)
  total = w.sum()
  frac = lambda r: [float((w * (routes[l] == r)).sum() / total) for l in range(num_layers)]
  return {"ffn_compute": float((per_token * w).sum() / total / (num_layers * cost[BIG])),
          "mean_big_layers": float(((routes == BIG).sum(0) * w).sum() / total),
          "big_by_layer": frac(BIG), "small_by_layer": frac(SMALL), "skip_by_layer": frac(SKIP)}


def _exhaustive(duo, batch, chunk, progress):
  patterns = oracle_lib.patterns_within_budget(duo.num_layers, duo.num_layers)
  losses = oracle_lib.pattern_token_losses(duo.model, duo.params, batch, patterns, chunk,
                                           progress=progress)
  return patterns, losses


SEARCHES = ("auto", "exhaustive", "local")


def _lookup(patterns, table):
  """Indices of patterns [n, L] in the evaluated patterns `table` [P, L]."""
  index = {tuple(p): i for i, p in enumerate(np.asarray(table).tolist())}
  return np.asarray([index[tuple(p)] for p in np.asarray(patterns).tolist()], np.int64)


def _random_draws(num_layers: int, num_random: int, seed: int) -> dict:
  """Per budget k, `num_random` random routings: patterns with exactly k BIG layers (a uniform
  subset), SMALL elsewhere, each applied to every token (`oracle.random_patterns`)."""
  rng = np.random.default_rng(seed)
  return {k: oracle_lib.random_patterns(num_layers, num_random, k, rng)
          for k in range(num_layers + 1)}


def search_gap(duo: "DuoModel", batch: dict, num_free: int, *, chunk: int = 9,
               per_round: int = 64, caps: Sequence[Optional[int]] = (None,),
               progress=None) -> dict:
  """The local search's gap to the exhaustive oracle on `num_free` layers of a trained model.

  The free layers are spread evenly over the depth; the others stay SMALL. Every one of the
  3^num_free patterns is evaluated once (the exhaustive oracle), and `oracle.local_search` runs
  on a lookup into that table (no random starts: the search alone), with each cap on the
  patterns it may evaluate (None: until it converges). Gap = mean search-oracle loss - mean
  exhaustive-oracle loss, per budget, in nats and bits/byte.
  """
  num_layers = duo.num_layers
  free = np.unique(np.round(np.linspace(0, num_layers - 1, num_free)).astype(int))
  sub = oracle_lib.patterns_within_budget(len(free), len(free))
  full = np.full((len(sub), num_layers), SMALL, np.int32)
  full[:, free] = sub
  table = oracle_lib.pattern_token_losses(duo.model, duo.params, batch, full, chunk,
                                          progress=progress)
  weights = batch["weights"]
  macs = oracle_lib.pattern_macs(sub, *duo.widths)
  nbig = (sub == BIG).sum(1)
  exact = [oracle_lib.oracle(table[nbig <= k], sub[nbig <= k], weights, macs[nbig <= k])
           ["mean_oracle_loss"] for k in range(len(free) + 1)]
  evaluate = lambda pats: table[_lookup(pats, sub)]
  runs = []
  for cap in caps:
    got = oracle_lib.local_search(evaluate, len(free), weights, per_round=per_round,
                                  max_patterns=cap or len(sub))
    pats, losses = got["patterns"], got["losses"]
    pm, pb = oracle_lib.pattern_macs(pats, *duo.widths), (pats == BIG).sum(1)
    found = [oracle_lib.oracle(losses[pb <= k], pats[pb <= k], weights, pm[pb <= k])
             ["mean_oracle_loss"] for k in range(len(free) + 1)]
    gaps = np.asarray(found) - np.asarray(exact)
    runs.append({"cap": cap, "evaluated": int(len(pats)), "rounds": got["rounds"],
                 "converged": got["converged"], "oracle_loss": found,
                 "gap_nats": gaps.tolist(),
                 "gap_bits_per_byte": [bits_per_byte(g, batch) for g in gaps]})
  return {"free_layers": free.tolist(), "num_patterns": int(len(sub)), "exhaustive_loss": exact,
          "exhaustive_bits_per_byte": [bits_per_byte(e, batch) for e in exact], "runs": runs}


def _position_bins(by_position, num_bins: int = 8) -> list:
  """Mean of [t] values over `num_bins` equal runs of positions."""
  return [float(np.nanmean(part)) for part in np.array_split(np.asarray(by_position), num_bins)]


def run_analysis(checkpoint_dir: str, output_dir: str, *, router_dirs: Sequence[str] = (),
                 split: str = "validation", num_batches: int = 4,
                 batch_size: Optional[int] = None, seq_len: Optional[int] = None,
                 headline_big: int = 1, chunk: int = 9, bindings: Sequence[str] = (),
                 search: str = "auto", max_patterns: int = 2048, per_round: int = 63,
                 num_random: int = 100, seed: int = 0, gap_free_layers: Sequence[int] = (),
                 plots: bool = True, verbose: bool = True) -> dict:
  """Runs the oracle search and router comparison; writes analysis.json and the PNG plots.

  Args:
    checkpoint_dir: a Duo run trained with random routes (every pattern valid).
    output_dir: created if missing; existing files of the same names are replaced.
    router_dirs: router-stage runs sharing the base weights; each is evaluated with its own
      routing on the same tokens.
    num_batches, batch_size, seq_len: the held-out tokens (defaults: the run's own sizes).
    headline_big: the BIG-layer budget of the headline comparison and of the per-layer plot.
    chunk: patterns per vmapped forward pass (memory grows with it).
    search: "exhaustive" (every 3^L pattern), "local" (`oracle.local_search`, at most
      `max_patterns` patterns, `per_round` per batch, started from the random routings) or
      "auto": exhaustive when 3^L <= oracle.MAX_PATTERNS (L <= 10), local otherwise.
    num_random, seed: the random baseline, `num_random` random routings per budget.
    gap_free_layers: for each m, `search_gap` on m layers (3^m patterns evaluated; its
      search in rounds of `chunk` patterns).
  """
  say = print if verbose else (lambda *a, **k: None)
  if search not in SEARCHES:
    raise ValueError(f"search={search!r}; choose one of {SEARCHES}.")
  duo = load_duo(checkpoint_dir, bindings)
  num_layers = duo.num_layers
  count = 3 ** num_layers
  if search == "auto":
    search = "exhaustive" if count <= oracle_lib.MAX_PATTERNS else "local"
  if search == "exhaustive" and count > oracle_lib.MAX_PATTERNS:
    raise ValueError(
        f"{num_layers} layers give {count} routing patterns, too many for the exhaustive "
        f"search (limit {oracle_lib.MAX_PATTERNS}); use search='local' (or 'auto').")
  if not 0 <= headline_big <= num_layers:
    raise ValueError(f"headline_big must lie in [0, {num_layers}]; got {headline_big}.")
  batch = held_out_batch(duo.meta, split, num_batches, batch_size, seq_len)
  weights = batch["weights"]
  say(f"Duo checkpoint {checkpoint_dir} (step {duo.step}): {num_layers} layers, "
      f"{int(np.sum(weights)):,} held-out {split} tokens; {count} routing patterns, "
      f"{search} search")
  draws = _random_draws(num_layers, num_random, seed)
  bar = ProgressBar("patterns") if verbose else None
  search_info = {"method": search}
  if search == "exhaustive":
    patterns, losses = _exhaustive(duo, batch, chunk, bar)
  else:
    evaluate = lambda pats: oracle_lib.pattern_token_losses(duo.model, duo.params, batch, pats,
                                                            chunk)
    got = oracle_lib.local_search(evaluate, num_layers, weights,
                                  start=np.concatenate(list(draws.values())),
                                  per_round=per_round, max_patterns=max_patterns, progress=bar)
    patterns, losses = got["patterns"], got["losses"]
    search_info.update(evaluated=int(len(patterns)), rounds=got["rounds"],
                       converged=got["converged"], per_round=per_round,
                       max_patterns=max_patterns)
  widths = duo.widths
  d_model, d_ff, d_small = widths
  macs = oracle_lib.pattern_macs(patterns, d_model, d_ff, d_small)
  full = num_layers * ffn_macs(d_model, d_ff)
  num_big = (patterns == BIG).sum(axis=1)
  no_skip = (patterns != SKIP).all(axis=1)
  pattern_mean = oracle_lib._weighted_mean(losses, weights)  # pylint: disable=protected-access
  bpb = lambda nats: bits_per_byte(nats, batch)
  index = {tuple(p): i for i, p in enumerate(patterns.tolist())}
  all_big = index[(BIG,) * num_layers]
  all_small = index[(SMALL,) * num_layers]
  position_budgets = sorted({headline_big, num_layers // 2, num_layers})

  budgets = []
  oracle_at = {}
  for k in range(num_layers + 1):
    subset = np.flatnonzero(num_big <= k)
    res = oracle_lib.oracle(losses[subset], patterns[subset], weights, macs[subset])
    oracle_at[k] = (subset, res)
    static = subset[int(np.argmin(pattern_mean[subset]))]
    drawn = _lookup(draws[k], patterns)
    best_drawn = drawn[int(np.argmin(pattern_mean[drawn]))]
    entry = {
        "max_big": k,
        "oracle": {"bits_per_byte": bpb(res["mean_oracle_loss"]),
                   "loss": res["mean_oracle_loss"],
                   "ffn_compute": res["mean_oracle_macs"] / full,
                   "mean_big_layers": float(np.sum(res["big_fraction"])),
                   "big_by_layer": res["big_fraction"].tolist()},
        "best_static": {"pattern": [ROUTE_NAMES[r] for r in patterns[static]],
                        "bits_per_byte": bpb(pattern_mean[static]),
                        "loss": float(pattern_mean[static]),
                        "ffn_compute": float(macs[static] / full)},
        "random": {"n": int(num_random),
                   "bits_per_byte": bpb(pattern_mean[drawn].mean()),
                   "loss": float(pattern_mean[drawn].mean()),
                   "ffn_compute": float(macs[drawn].mean() / full)},
        "random_best": {"n": int(num_random),
                        "pattern": [ROUTE_NAMES[r] for r in patterns[best_drawn]],
                        "bits_per_byte": bpb(pattern_mean[best_drawn]),
                        "loss": float(pattern_mean[best_drawn]),
                        "ffn_compute": float(macs[best_drawn] / full)},
    }
    if k in position_budgets:
      entry["oracle"]["big_layers_by_position"] = _position_bins(res["big_layers_by_position"])
    if search == "exhaustive":
      # Exact expectation of each layer BIG w.p. k / L, else SMALL: needs every such pattern.
      bs = np.flatnonzero(no_skip)
      p = k / num_layers
      binom = p ** num_big[bs] * (1 - p) ** (num_layers - num_big[bs])
      entry["uniform"] = {"bits_per_byte": bpb(np.sum(binom * pattern_mean[bs])),
                          "loss": float(np.sum(binom * pattern_mean[bs])),
                          "ffn_compute": float(np.sum(binom * macs[bs]) / full)}
    budgets.append(entry)

  routers = []
  for rdir in router_dirs:
    say(f"Router checkpoint {rdir}: evaluating its own routes")
    rmodel = load_duo(rdir, bindings)
    if rmodel.num_layers != num_layers or rmodel.widths != widths:
      raise ValueError(f"Router checkpoint {rdir} has another architecture than "
                       f"{checkpoint_dir}; train it from that run (configs/duo_router.gin).")
    run = router_run(rmodel, batch)
    mean = float(oracle_lib._weighted_mean(run["loss"][None], weights)[0])  # pylint: disable=protected-access
    stats = _route_stats(run["routes"], weights, widths)
    k = int(np.clip(round(stats["mean_big_layers"]), 0, num_layers))
    routers.append({"checkpoint_dir": str(rdir), "step": rmodel.step, "mode": rmodel.ffn.mode,
                    "budget": list(rmodel.ffn.budget), "loss": mean,
                    "bits_per_byte": bpb(mean), **stats,
                    "against": {"max_big": k,
                                "random_bits_per_byte": budgets[k]["random"]["bits_per_byte"],
                                "random_best_bits_per_byte":
                                    budgets[k]["random_best"]["bits_per_byte"],
                                "oracle_bits_per_byte": budgets[k]["oracle"]["bits_per_byte"]}})

  _, top = oracle_at[num_layers]
  difficulty = top["difficulty"]  # all-SMALL minus the oracle over every searched pattern
  counted = np.asarray(weights) > 0
  diff_tokens = difficulty[counted]
  head_subset, head = oracle_at[headline_big]
  half = num_layers // 2
  headline = [
      {"name": "all big (dense)", "bits_per_byte": bpb(pattern_mean[all_big]),
       "ffn_compute": 1.0},
      {"name": "all small", "bits_per_byte": bpb(pattern_mean[all_small]),
       "ffn_compute": float(macs[all_small] / full)},
      {"name": f"oracle, <= {headline_big} big layer(s)", **{
          k: budgets[headline_big]["oracle"][k] for k in ("bits_per_byte", "ffn_compute")}},
      {"name": f"oracle, <= {half} big layers", **{
          k: budgets[half]["oracle"][k] for k in ("bits_per_byte", "ffn_compute")}},
      {"name": f"best static pattern, <= {headline_big} big",
       **{k: budgets[headline_big]["best_static"][k] for k in ("bits_per_byte", "ffn_compute")}},
      {"name": f"random, {headline_big} big (mean of {num_random})", **{
          k: budgets[headline_big]["random"][k] for k in ("bits_per_byte", "ffn_compute")}},
      {"name": f"random, {headline_big} big (best of {num_random})", **{
          k: budgets[headline_big]["random_best"][k] for k in ("bits_per_byte", "ffn_compute")}},
  ] + [{"name": f"router {os.path.basename(os.path.normpath(r['checkpoint_dir']))}",
        "bits_per_byte": r["bits_per_byte"], "ffn_compute": r["ffn_compute"],
        "mean_big_layers": r["mean_big_layers"]} for r in routers]

  by_position = budgets[half]["oracle"]["big_layers_by_position"]
  findings = {
      "one_big_oracle_vs_all_big": {
          "oracle_bits_per_byte": budgets[1]["oracle"]["bits_per_byte"],
          "all_big_bits_per_byte": bpb(pattern_mean[all_big]),
          "holds": bool(budgets[1]["oracle"]["bits_per_byte"] < bpb(pattern_mean[all_big]))},
      "half_big_oracle_vs_all_big": {
          "max_big": half, "oracle_bits_per_byte": budgets[half]["oracle"]["bits_per_byte"],
          "all_big_bits_per_byte": bpb(pattern_mean[all_big]),
          "holds": bool(budgets[half]["oracle"]["bits_per_byte"] < bpb(pattern_mean[all_big]))},
      "earlier_positions_use_big_more": {
          "max_big": half, "big_layers_by_position_bin": by_position,
          "holds": bool(by_position[0] > by_position[-1])},
      "routers_between_random_and_oracle": [
          {"router": os.path.basename(os.path.normpath(r["checkpoint_dir"])),
           "bits_per_byte": r["bits_per_byte"], **r["against"]} for r in routers],
  }
  report = {
      "checkpoint_dir": str(checkpoint_dir), "step": duo.step, "split": split,
      "num_tokens": int(counted.sum()), "num_layers": num_layers,
      "d_model": d_model, "d_ff": d_ff, "d_ff_small": d_small, "num_patterns": int(count),
      "search": search_info, "evaluated_patterns": int(len(patterns)),
      "all_big": {"bits_per_byte": bpb(pattern_mean[all_big])},
      "all_small": {"bits_per_byte": bpb(pattern_mean[all_small]),
                    "ffn_compute": float(macs[all_small] / full)},
      "budgets": budgets, "routers": routers, "headline_max_big": headline_big,
      "headline": headline, "findings": findings,
      "difficulty": {
          "definition": "nats: loss under all-small minus the oracle loss over every searched "
                        "pattern (adacomp.methods.duo.oracle)",
          "mean": float(diff_tokens.mean()), "median": float(np.median(diff_tokens)),
          "quantiles": {str(q): float(np.quantile(diff_tokens, q))
                        for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)},
          "fraction_below_0.1_nats": float(np.mean(diff_tokens < 0.1))},
      "oracle_pattern_usage": _top_patterns(head["best"], patterns[head_subset], counted),
  }
  for m in gap_free_layers:
    say(f"Search gap on {m} free layers ({3 ** m} patterns)")
    # Rounds of one chunk: the gap's search reads a table, so small rounds cost nothing.
    report.setdefault("search_gap", []).append(search_gap(
        duo, batch, m, chunk=chunk, per_round=chunk,
        caps=(3 ** m // 10, 3 ** m // 4, None), progress=ProgressBar("patterns") if verbose
        else None))
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "analysis.json"), "w") as f:
    json.dump(report, f, indent=2)
  if plots:
    _plot(report, diff_tokens, output_dir)
  say(format_headline(report))
  say(format_findings(report))
  say(f"Wrote {output_dir}/analysis.json" + (", loss_vs_compute.png, big_by_layer.png, "
                                             "difficulty.png" if plots else ""))
  return report


def _top_patterns(best, patterns, counted, n: int = 8) -> list:
  """The oracle's most used patterns and the share of tokens each serves."""
  ids, counts = np.unique(best[counted], return_counts=True)
  order = np.argsort(-counts)[:n]
  total = counts.sum()
  return [{"pattern": [ROUTE_NAMES[r] for r in patterns[ids[i]]],
           "share": float(counts[i] / total)} for i in order]


def format_headline(report: dict) -> str:
  rows = ["| routing | bits/byte | FFN compute (vs all big) |", "|---|---:|---:|"]
  for r in report["headline"]:
    rows.append(f"| {r['name']} | {r['bits_per_byte']:.3f} | {r['ffn_compute']:.3f} |")
  return "\n".join(rows)


def format_findings(report: dict) -> str:
  """The paper's findings, checked: one row each, with the numbers behind it."""
  f = report["findings"]
  rows = ["| finding | numbers | holds |", "|---|---|---|"]
  one, half = f["one_big_oracle_vs_all_big"], f["half_big_oracle_vs_all_big"]
  rows.append(f"| oracle with <= 1 big layer beats all big | {one['oracle_bits_per_byte']:.3f} "
              f"vs {one['all_big_bits_per_byte']:.3f} | {one['holds']} |")
  rows.append(f"| oracle with <= {half['max_big']} big layers beats all big | "
              f"{half['oracle_bits_per_byte']:.3f} vs {half['all_big_bits_per_byte']:.3f} | "
              f"{half['holds']} |")
  pos = f["earlier_positions_use_big_more"]
  bins = ", ".join(f"{v:.2f}" for v in pos["big_layers_by_position_bin"])
  rows.append(f"| earlier positions use big more (oracle <= {pos['max_big']} big; mean big "
              f"layers by position bin) | {bins} | {pos['holds']} |")
  for r in f["routers_between_random_and_oracle"]:
    rows.append(f"| router {r['router']} between random and oracle (k = {r['max_big']}) | "
                f"router {r['bits_per_byte']:.3f}; random mean {r['random_bits_per_byte']:.3f}, "
                f"best {r['random_best_bits_per_byte']:.3f}; oracle "
                f"{r['oracle_bits_per_byte']:.3f} | "
                f"{r['oracle_bits_per_byte'] < r['bits_per_byte']} |")
  return "\n".join(rows)


def _plot(report: dict, diff_tokens, output_dir: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  budgets = report["budgets"]
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for key, style, label in (("oracle", "o-", "oracle (per token, <= k big)"),
                            ("best_static", "s--", "best static pattern (<= k big)"),
                            ("random", "^:", "random (k big, rest small; mean)"),
                            ("random_best", "<:", "random (best of N)"),
                            ("uniform", "v-.", "uniform (big w.p. k/L)")):
    if key not in budgets[0]:
      continue  # uniform needs every BIG/SMALL pattern: exhaustive search only
    xs = [b[key]["ffn_compute"] for b in budgets]
    ys = [b[key]["bits_per_byte"] for b in budgets]
    ax.plot(xs, ys, style, label=label, markersize=4)
  for b in budgets:
    ax.annotate(f"k={b['max_big']}", (b["oracle"]["ffn_compute"], b["oracle"]["bits_per_byte"]),
                textcoords="offset points", xytext=(3, -10), fontsize=7)
  ax.plot([1.0], [report["all_big"]["bits_per_byte"]], "k*", markersize=10, label="all big")
  ax.plot([report["all_small"]["ffn_compute"]], [report["all_small"]["bits_per_byte"]], "kx",
          markersize=8, label="all small")
  for r in report["routers"]:
    name = os.path.basename(os.path.normpath(r["checkpoint_dir"]))
    ax.plot([r["ffn_compute"]], [r["bits_per_byte"]], "D", markersize=7,
            label=f"trained router ({name})")
  ax.set_xlabel("FFN compute per token (fraction of all-big)")
  ax.set_ylabel(f"bits per byte ({report['split']})")
  ax.set_title(f"Duo-LLM routing, {report['num_layers']} layers, {report['num_tokens']:,} tokens")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "loss_vs_compute.png"), dpi=120)
  plt.close(fig)

  k = report["headline_max_big"]
  layers = np.arange(report["num_layers"])
  series = [(f"oracle, <= {k} big", budgets[k]["oracle"]["big_by_layer"])]
  series += [(f"router {os.path.basename(os.path.normpath(r['checkpoint_dir']))}",
              r["big_by_layer"]) for r in report["routers"]]
  width = 0.8 / len(series)
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  for i, (label, values) in enumerate(series):
    ax.bar(layers + i * width - 0.4 + width / 2, values, width, label=label)
  ax.set_xticks(layers)
  ax.set_xlabel("layer")
  ax.set_ylabel("fraction of tokens routed BIG")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "big_by_layer.png"), dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  ax.hist(np.clip(diff_tokens, 0, np.quantile(diff_tokens, 0.995)), bins=60, color="tab:blue")
  ax.set_xlabel("difficulty: loss(all small) - oracle loss (nats; last bin: 99.5th pct. and up)")
  ax.set_ylabel("tokens")
  ax.set_yscale("log")
  ax.set_title(f"median {np.median(diff_tokens):.3f}, mean {diff_tokens.mean():.3f} nats")
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "difficulty.png"), dpi=120)
  plt.close(fig)
