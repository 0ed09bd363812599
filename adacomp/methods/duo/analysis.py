"""Duo-LLM routing analysis: oracle vs trained routers vs random and uniform routing.

`run_analysis` loads a Duo checkpoint (a model trained with random routes, `configs/duo.gin`),
takes held-out batches, computes every token's loss under every routing pattern (exhaustive, via
`oracle.pattern_token_losses`, when 3^L patterns fit; greedy otherwise) and reports, for each
budget k = 0..L (at most k BIG layers per token):

  * oracle: each token its best pattern with <= k BIG layers, the other layers SMALL or SKIP
    (see `adacomp.methods.duo.oracle` for the context convention: a pattern is applied to the whole
    sequence, so oracle losses are lower bounds for a router with a fixed context);
  * best static: the one pattern with <= k BIG layers that is best on average, for every token;
  * random: each token a pattern drawn uniformly among those with exactly k BIG layers and
    SMALL elsewhere (the exact expectation, the mean over those patterns);
  * uniform: each token, at each layer independently, BIG with probability k / L, else SMALL
    (the exact expectation, a binomially weighted mean over the BIG/SMALL patterns).
  * trained routers (optional checkpoints of the router stage, `configs/duo_router.gin`): their
    own argmax routes on the same tokens, at the compute they actually spend.

Compute is FFN multiply-accumulates per token relative to all-BIG (attention, embeddings and the
router are the same for every pattern and left out); quality is bits per byte of the held-out
targets. Also: how often the oracle (at the budget of one BIG layer) and each router pick BIG at
each layer, and the distribution of per-token difficulty, the loss reduction extra compute buys:
loss under all-SMALL minus the oracle loss over every pattern.

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


def run_analysis(checkpoint_dir: str, output_dir: str, *, router_dirs: Sequence[str] = (),
                 split: str = "validation", num_batches: int = 4,
                 batch_size: Optional[int] = None, seq_len: Optional[int] = None,
                 headline_big: int = 1, chunk: int = 9, bindings: Sequence[str] = (),
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
  """
  say = print if verbose else (lambda *a, **k: None)
  duo = load_duo(checkpoint_dir, bindings)
  num_layers = duo.num_layers
  count = 3 ** num_layers
  if count > oracle_lib.MAX_PATTERNS:
    raise ValueError(
        f"{num_layers} layers give {count} routing patterns, too many for the exhaustive "
        f"search; use oracle.greedy_search for deep models (not wired into this report yet).")
  if not 0 <= headline_big <= num_layers:
    raise ValueError(f"headline_big must lie in [0, {num_layers}]; got {headline_big}.")
  batch = held_out_batch(duo.meta, split, num_batches, batch_size, seq_len)
  weights = batch["weights"]
  say(f"Duo checkpoint {checkpoint_dir} (step {duo.step}): {num_layers} layers, "
      f"{int(np.sum(weights)):,} held-out {split} tokens; {count} routing patterns")
  patterns, losses = _exhaustive(duo, batch, chunk,
                                 ProgressBar("patterns") if verbose else None)
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

  budgets = []
  oracle_at = {}
  for k in range(num_layers + 1):
    subset = np.flatnonzero(num_big <= k)
    res = oracle_lib.oracle(losses[subset], patterns[subset], weights, macs[subset])
    oracle_at[k] = (subset, res)
    static = subset[int(np.argmin(pattern_mean[subset]))]
    exact = np.flatnonzero((num_big == k) & no_skip)
    bs = np.flatnonzero(no_skip)
    p = k / num_layers
    binom = p ** num_big[bs] * (1 - p) ** (num_layers - num_big[bs])
    budgets.append({
        "max_big": k,
        "oracle": {"bits_per_byte": bpb(res["mean_oracle_loss"]),
                   "loss": res["mean_oracle_loss"],
                   "ffn_compute": res["mean_oracle_macs"] / full,
                   "big_by_layer": res["big_fraction"].tolist()},
        "best_static": {"pattern": [ROUTE_NAMES[r] for r in patterns[static]],
                        "bits_per_byte": bpb(pattern_mean[static]),
                        "loss": float(pattern_mean[static]),
                        "ffn_compute": float(macs[static] / full)},
        "random": {"bits_per_byte": bpb(pattern_mean[exact].mean()),
                   "loss": float(pattern_mean[exact].mean()),
                   "ffn_compute": float(macs[exact].mean() / full)},
        "uniform": {"bits_per_byte": bpb(np.sum(binom * pattern_mean[bs])),
                    "loss": float(np.sum(binom * pattern_mean[bs])),
                    "ffn_compute": float(np.sum(binom * macs[bs]) / full)},
    })

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
    routers.append({"checkpoint_dir": str(rdir), "mode": rmodel.ffn.mode,
                    "budget": list(rmodel.ffn.budget), "loss": mean,
                    "bits_per_byte": bpb(mean), **stats})

  _, top = oracle_at[num_layers]
  difficulty = losses[all_small] - top["oracle_loss"]
  counted = np.asarray(weights) > 0
  diff_tokens = difficulty[counted]
  head_subset, head = oracle_at[headline_big]
  headline = [
      {"name": "all big (dense)", "bits_per_byte": bpb(pattern_mean[all_big]),
       "ffn_compute": 1.0},
      {"name": "all small", "bits_per_byte": bpb(pattern_mean[all_small]),
       "ffn_compute": float(macs[all_small] / full)},
      {"name": f"oracle, <= {headline_big} big layer(s)", **{
          k: budgets[headline_big]["oracle"][k] for k in ("bits_per_byte", "ffn_compute")}},
      {"name": f"best static pattern, <= {headline_big} big",
       **{k: budgets[headline_big]["best_static"][k] for k in ("bits_per_byte", "ffn_compute")}},
      {"name": f"random, {headline_big} big", **{
          k: budgets[headline_big]["random"][k] for k in ("bits_per_byte", "ffn_compute")}},
  ] + [{"name": f"router {os.path.basename(os.path.normpath(r['checkpoint_dir']))}",
        "bits_per_byte": r["bits_per_byte"], "ffn_compute": r["ffn_compute"],
        "mean_big_layers": r["mean_big_layers"]} for r in routers]

  report = {
      "checkpoint_dir": str(checkpoint_dir), "step": duo.step, "split": split,
      "num_tokens": int(counted.sum()), "num_layers": num_layers,
      "d_model": d_model, "d_ff": d_ff, "d_ff_small": d_small, "num_patterns": int(count),
      "all_big": {"bits_per_byte": bpb(pattern_mean[all_big])},
      "all_small": {"bits_per_byte": bpb(pattern_mean[all_small]),
                    "ffn_compute": float(macs[all_small] / full)},
      "budgets": budgets, "routers": routers, "headline_max_big": headline_big,
      "headline": headline,
      "difficulty": {
          "definition": "nats: loss under all-small minus the oracle loss over every pattern",
          "mean": float(diff_tokens.mean()), "median": float(np.median(diff_tokens)),
          "quantiles": {str(q): float(np.quantile(diff_tokens, q))
                        for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)},
          "fraction_below_0.1_nats": float(np.mean(diff_tokens < 0.1))},
      "oracle_pattern_usage": _top_patterns(head["best"], patterns[head_subset], counted),
  }
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "analysis.json"), "w") as f:
    json.dump(report, f, indent=2)
  if plots:
    _plot(report, diff_tokens, output_dir)
  say(format_headline(report))
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


def _plot(report: dict, diff_tokens, output_dir: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  budgets = report["budgets"]
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for key, style, label in (("oracle", "o-", "oracle (per token, <= k big)"),
                            ("best_static", "s--", "best static pattern (<= k big)"),
                            ("random", "^:", "random (k big, rest small)"),
                            ("uniform", "v-.", "uniform (big w.p. k/L)")):
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
