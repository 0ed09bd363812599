"""The Pareto evaluator: compute figures against formulas, monotone in each budget knob."""
import json

import gin
import numpy as np
import pytest

from adacomp import training
from adacomp import pareto
from tests.corpus import configure

# tests/testdata/tiny_train.gin: 2 layers, d_model 32, 2 heads x 16, d_ff 64, seq_len 32.
L, D, INNER, F, T = 2, 32, 32, 64, 32


def _train(corpus, workdir, *bindings):
  gin.clear_config()
  configure(corpus, *bindings)
  return training.train(str(workdir))


def _model_macs(width, vocab, layers=L):
  """Per-token MACs of the tiny decoder, averaged over positions 0..T-1 (formula, not sown)."""
  attention = 4 * D * INNER + 2 * INNER * (T + 1) / 2
  return layers * (attention + 2 * D * width) + D * vocab


@pytest.fixture(scope="module", name="result")
def _result(corpus, tmp_path_factory):
  root = tmp_path_factory.mktemp("pareto")
  quiet = ("train.eval_every = 0", "make_manager.save_every = 100", "train.num_steps = 1")
  _train(corpus, root / "dense", *quiet)
  _train(corpus, root / "duo", *quiet, "DecoderConfig.ffn_cls = @duo_ffn()")
  _train(corpus, root / "informed", *quiet, "DecoderConfig.ffn_cls = @routed_ffn()",
         "routed_ffn.mode = 'informed'", "routed_ffn.sparsity = 0.5")
  skip = ("position_layer_mask.fn = @layer_mask_for_training",
          "layer_mask_for_training.schedule = @schedule_for_speedup",
          "schedule_for_speedup.warmup_len = 8", "layer_mask_for_training.warmup_layers = 1")
  entries = [
      pareto.parse_entry(f"dense={root / 'dense'}"),
      pareto.parse_entry(f"duo big={root / 'duo'};duo_ffn.mode='big'"),
      pareto.parse_entry(f"duo small={root / 'duo'};duo_ffn.mode='small'"),
      pareto.parse_entry(f"duo p0.5={root / 'duo'};duo_ffn.mode='random';"
                         f"duo_ffn.mix=(0.0, 0.5, 0.5)"),
      # The top-k capacity is the budget knob (routing is causal unless an entry says).
      *[pareto.parse_entry(f"informed {sp}={root / 'informed'};routed_ffn.sparsity={sp};"
                           f"routed_ffn.compute='gather';routed_ffn.decision='topk'")
        for sp in (0.25, 0.5, 0.75)],
      pareto.parse_entry(f"informed causal={root / 'informed'};routed_ffn.compute='gather'"),
      pareto.parse_entry(f"skip 1.5x={root / 'dense'};" + ";".join(skip) +
                         ";schedule_for_speedup.speedup=1.5;ref=dense"),
      pareto.parse_entry(f"skip 2x={root / 'dense'};" + ";".join(skip) +
                         ";schedule_for_speedup.speedup=2.0;ref=dense"),
  ]
  result = pareto.run_pareto(entries, str(root / "out"), eval_batches=2, rounds=1,
                             batch_size=2, prompt_len=8, verbose=False)
  return root, {r["label"]: r for r in result["rows"]}


def test_dense_is_one_and_all_small_duo_is_the_flop_ratio(result):
  root, rows = result
  vocab = json.load(open(root / "out" / "evals" / "dense.json"))["macs_per_token"]
  vocab = (vocab - _model_macs(F, 0)) / D  # the LM head's share gives the vocabulary size
  assert vocab == pytest.approx(round(vocab), abs=1e-3)
  assert rows["dense"]["compute"] == 1.0
  assert rows["duo big"]["compute"] == pytest.approx(1.0)
  ratio = _model_macs(F // 4, round(vocab)) / _model_macs(F, round(vocab))
  assert rows["duo small"]["compute"] == pytest.approx(ratio, rel=1e-6)


def test_compute_is_monotone_in_each_budget_knob(result):
  _, rows = result
  duo = [rows[k]["compute"] for k in ("duo small", "duo p0.5", "duo big")]  # p_big 0, 0.5, 1
  assert duo[0] < duo[1] < duo[2]
  skip = [rows[k]["compute"] for k in ("dense", "skip 1.5x", "skip 2x")]
  assert skip[0] > skip[1] > skip[2]
  informed = [rows[f"informed {sp}"]["compute"] for sp in (0.25, 0.5, 0.75)]  # sparsity
  assert informed[0] > informed[1] > informed[2]


def test_routed_entries_are_causal_unless_they_ask_for_top_k(result):
  _, rows = result
  assert rows["informed causal"]["routing"] == "causal"
  assert all(rows[f"informed {sp}"]["routing"] == "topk" for sp in (0.25, 0.5, 0.75))
  assert "routing" not in rows["dense"]


def test_skipdecode_entries_are_timed_generating_and_the_rest_forward(result):
  root, rows = result
  assert rows["skip 2x"]["timing"] == "generate" and rows["dense"]["timing"] == "forward"
  assert rows["skip 2x"]["reference"] == "dense"
  # Times are relative to the entry's reference: the reference itself is exactly 1.
  assert rows["dense"]["reference"] == "dense" and rows["dense"]["time"] == 1.0
  assert all(np.isfinite(r["time"]) for r in rows.values())
  saved = json.load(open(root / "out" / "pareto.json"))["rows"]
  assert {r["label"]: r for r in saved} == rows



def test_table_names_each_entrys_own_reference():
  row = dict(quality=3.5, quality_name="bits per byte", compute=0.5, time=0.4, timing="generate")
  table = pareto.format_table({"rows": [
      dict(row, label="dense 12 layers", reference="dense 12 layers"),
      dict(row, label="skip 2x", reference="dense 12 layers"),
      dict(row, label="informed", reference="dense", routing="topk")]}).splitlines()
  assert "vs its dense reference" in table[0]
  assert table[2].startswith("| dense 12 layers | ")
  assert table[3].startswith("| skip 2x (vs dense 12 layers) | 3.500 bits per byte | 0.500 | 0.40 |")
  assert table[4].startswith("| informed (top-k, not causal) (vs dense) | ")

def test_plot_is_the_two_panel_figure_with_drawn_points(result):
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  root, _ = result
  image = matplotlib.image.imread(root / "out" / "pareto.png")
  # One task (lm): figsize (12, 5.2) inches at 120 dpi.
  assert image.shape[:2] == (round(5.2 * 120), 12 * 120), image.shape
  # Coloured markers and lines, not a blank canvas: pixels far from white and from grey.
  rgb = image[..., :3]
  coloured = (rgb.max(-1) - rgb.min(-1)) > 0.2
  assert coloured.mean() > 1e-3, coloured.mean()


def test_entry_syntax_errors_name_the_fix():
  with pytest.raises(ValueError, match="label=CHECKPOINT_DIR"):
    pareto.parse_entry("/tmp/no_label")
  entry = pareto.parse_entry("a=/x;duo_ffn.mode='small';ref=b")
  assert (entry.bindings, entry.ref) == (("duo_ffn.mode='small'",), "b")
