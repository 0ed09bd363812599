"""The Duo-LLM oracle report end to end: a tiny random-route run, a router run, the analysis."""
import json
import os

import gin
import pytest

from adacomp import evaluation, gin_utils, training
from adacomp.methods.duo import analysis as duo_analysis
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


def test_oracle_curves_are_ordered_as_their_definitions_demand(runs):
  _, report = runs
  budgets = report["budgets"]
  oracle = [b["oracle"]["loss"] for b in budgets]
  assert all(a >= b - 1e-6 for a, b in zip(oracle, oracle[1:]))  # more budget never hurts
  for b in budgets:
    # per-token choice <= the best single pattern <= the mean of the exactly-k patterns
    assert b["oracle"]["loss"] <= b["best_static"]["loss"] + 1e-6
    assert b["best_static"]["loss"] <= b["random"]["loss"] + 1e-6
  # uniform routing with p = 0 is all small, with p = 1 all big; random with k = L is all big
  assert budgets[0]["uniform"]["bits_per_byte"] == pytest.approx(
      report["all_small"]["bits_per_byte"], rel=1e-6)
  assert budgets[-1]["uniform"]["bits_per_byte"] == pytest.approx(
      report["all_big"]["bits_per_byte"], rel=1e-6)
  assert budgets[-1]["random"]["ffn_compute"] == pytest.approx(1.0)
  assert report["num_patterns"] == 3 ** report["num_layers"]
  assert report["difficulty"]["quantiles"]["0.1"] >= -1e-6  # all-small is one of the patterns


def test_report_files_are_written(runs):
  root, report = runs
  with open(root / "out" / "analysis.json") as f:
    assert json.load(f)["headline"] == json.loads(json.dumps(report["headline"]))
  for name in ("loss_vs_compute.png", "big_by_layer.png", "difficulty.png"):
    assert (root / "out" / name).stat().st_size > 5000


def test_a_dense_checkpoint_is_refused_with_the_fix(corpus, tmp_path):
  _train(corpus, tmp_path / "dense", "train.num_steps = 2", "train.eval_every = 0")
  with pytest.raises(ValueError, match="not a Duo-LLM checkpoint.*configs/duo.gin"):
    duo_analysis.run_analysis(str(tmp_path / "dense"), str(tmp_path / "out"), verbose=False)
