"""The Duo-LLM oracle report end to end: a tiny random-route run, a router run, the analysis."""
import itertools
import json
import os

import gin
import matplotlib.image
import numpy as np
import optax
import pytest

from adacomp import evaluation, gin_utils, training
from adacomp.methods.duo import analysis as duo_analysis
from layers.duo import BIG, SKIP, SMALL
from tests.corpus import configure

DUO = ("DecoderConfig.ffn_cls = @duo_ffn()", "duo_ffn.mode = 'random'", "train.eval_every = 0",
       "make_manager.save_every = 100")


def _train(corpus, workdir, *bindings):
  gin.clear_config()
  configure(corpus, *bindings)
  return training.train(str(workdir))


def _evaluate(workdir, *bindings):
  step, meta = gin_utils.parse_checkpoint_config(str(workdir), gin_bindings=bindings)
  return evaluation.evaluate_checkpoint(str(workdir), meta, step, output=os.devnull)


@pytest.fixture(scope="module", name="runs")
def _runs(corpus, tmp_path_factory):
  root = tmp_path_factory.mktemp("duo")
  _train(corpus, root / "base", "train.num_steps = 6", *DUO)
  _train(corpus, root / "router", "train.num_steps = 3", *DUO, "duo_ffn.mode = 'router'",
         f"train.init_checkpoint = '{root / 'base'}'", "make_optimizer.trainable = 'router'",
         "duo_ffn.budget = (0.2, 0.4, 0.4)")
  report = duo_analysis.run_analysis(str(root / "base"), str(root / "out"),
                                     router_dirs=[str(root / "router")], num_batches=2,
                                     verbose=False)
  return root, report


def test_all_big_and_router_figures_match_eval_py(runs):
  root, report = runs
  eval_big = _evaluate(root / "base", "duo_ffn.mode = 'big'", "evaluate_checkpoint.eval_batches = 2")
  assert report["all_big"]["bits_per_byte"] == pytest.approx(eval_big["bits_per_byte"], rel=1e-5)
  eval_router = _evaluate(root / "router", "evaluate_checkpoint.eval_batches = 2")
  (router,) = report["routers"]
  assert router["bits_per_byte"] == pytest.approx(eval_router["bits_per_byte"], rel=1e-5)
  # eval.py's MACs/token: the FFN routes + the router (d*3 per layer) on top of the skip model.
  eval_skip = _evaluate(root / "router", "duo_ffn.mode = 'skip'",
                        "evaluate_checkpoint.eval_batches = 2")
  L, d, f = report["num_layers"], report["d_model"], report["d_ff"]
  ffn_macs = eval_router["macs_per_token"] - eval_skip["macs_per_token"] - L * d * 3
  assert router["ffn_compute"] == pytest.approx(ffn_macs / (L * 2 * d * f), rel=1e-5)


def _brute_force_table(root):
  """Every pattern's per-token loss by a direct forward pass each (no vmap, no chunks)."""
  duo = duo_analysis.load_duo(str(root / "base"))
  batch = duo_analysis.held_out_batch(duo.meta, "validation", 2)
  num_layers = duo.num_layers
  patterns = np.array(list(itertools.product((SKIP, SMALL, BIG), repeat=num_layers)), np.int32)
  b, t = batch["inputs"].shape
  losses = []
  for pattern in patterns:
    routes = np.broadcast_to(pattern[:, None, None], (num_layers, b, t))
    logits = duo.model.apply({"params": duo.params}, batch["inputs"], routes=routes)
    losses.append(np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["targets"])))
  return patterns, np.stack(losses), batch


def test_report_figures_equal_a_brute_force_recomputation(runs):
  root, report = runs
  patterns, losses, batch = _brute_force_table(root)
  w = batch["weights"]
  mean = lambda x: float((x * w).sum() / w.sum())
  bpb = lambda nats: duo_analysis.bits_per_byte(nats, batch)
  num_big = (patterns == BIG).sum(1)
  draws = duo_analysis._random_draws(report["num_layers"], 100, 0)  # pylint: disable=protected-access
  index = {tuple(p): i for i, p in enumerate(patterns.tolist())}
  for k, got in enumerate(report["budgets"]):
    ok = num_big <= k
    assert got["oracle"]["loss"] == pytest.approx(mean(losses[ok].min(0)), rel=1e-5)
    assert got["best_static"]["loss"] == pytest.approx(
        min(mean(losses[i]) for i in np.flatnonzero(ok)), rel=1e-5)
    drawn = [mean(losses[index[tuple(p)]]) for p in draws[k].tolist()]
    assert got["random"]["loss"] == pytest.approx(np.mean(drawn), rel=1e-5)
    assert got["random_best"]["loss"] == pytest.approx(min(drawn), rel=1e-5)
    assert got["random"]["bits_per_byte"] == pytest.approx(bpb(np.mean(drawn)), rel=1e-5)
  all_small = index[(SMALL,) * report["num_layers"]]
  difficulty = (losses[all_small] - losses.min(0))[w > 0]
  assert report["difficulty"]["mean"] == pytest.approx(difficulty.mean(), rel=1e-5)
  assert report["difficulty"]["quantiles"]["0.9"] == pytest.approx(
      np.quantile(difficulty, 0.9), rel=1e-5, abs=1e-6)
  # Uniform routing with p = 0 is all small, with p = 1 all big.
  assert report["budgets"][0]["uniform"]["bits_per_byte"] == pytest.approx(
      report["all_small"]["bits_per_byte"], rel=1e-6)
  assert report["budgets"][-1]["uniform"]["bits_per_byte"] == pytest.approx(
      report["all_big"]["bits_per_byte"], rel=1e-6)
  assert report["search"]["method"] == "exhaustive" and report["num_patterns"] == len(patterns)


def test_local_search_report_and_gap_agree_with_the_exhaustive_one(runs):
  root, report = runs
  local = duo_analysis.run_analysis(str(root / "base"), str(root / "local"), num_batches=2,
                                    search="local", max_patterns=6, per_round=3,
                                    gap_free_layers=[2], plots=False, verbose=False)
  assert local["search"] == {"method": "local", "evaluated": 6, "rounds": 1,
                             "converged": False, "per_round": 3, "max_patterns": 6}
  assert "uniform" not in local["budgets"][0]
  # The anchors and the random routings are the same patterns on the same tokens.
  assert local["all_big"] == report["all_big"] and local["all_small"] == report["all_small"]
  for a, b in zip(local["budgets"], report["budgets"]):
    assert a["random"] == b["random"] and a["random_best"] == b["random_best"]
  # Both layers free: the gap's exhaustive table is the report's.
  (gap,) = local["search_gap"]
  assert gap["free_layers"] == [0, 1] and gap["num_patterns"] == 9
  np.testing.assert_allclose(gap["exhaustive_loss"], [b["oracle"]["loss"] for b in
                                                       report["budgets"]], rtol=1e-5)


def test_report_files_are_written(runs):
  root, report = runs
  with open(root / "out" / "analysis.json") as f:
    assert json.load(f)["headline"] == json.loads(json.dumps(report["headline"]))
  # figsize x dpi of each figure (analysis._plot), and something drawn on it.
  for name, size in (("loss_vs_compute.png", (528, 768)), ("big_by_layer.png", (432, 768)),
                     ("difficulty.png", (432, 768))):
    image = matplotlib.image.imread(root / "out" / name)
    assert image.shape[:2] == size, name
    assert np.std(image[..., :3]) > 0.05, name


def test_a_dense_checkpoint_is_refused_with_the_fix(corpus, tmp_path):
  _train(corpus, tmp_path / "dense", "train.num_steps = 2", "train.eval_every = 0")
  with pytest.raises(ValueError, match="not a Duo-LLM checkpoint.*configs/duo.gin"):
    duo_analysis.run_analysis(str(tmp_path / "dense"), str(tmp_path / "out"), verbose=False)
