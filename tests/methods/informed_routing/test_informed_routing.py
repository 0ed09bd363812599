"""Informed routing's staged training end to end, with the real configs on a tiny model:
dense -> forecaster distillation -> router -> LoRA; the greedy (MoD) baseline from the same
dense run."""
import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adacomp import checkpointing, gin_utils, training
from tests.corpus import REPO, TINY_GIN, corpus_bindings

L, D, F, R, H = 2, 32, 64, 32 // 8, 32 // 4  # tiny_train.gin sizes; rank d/8, router d/4
FAST = ("train.num_steps = 4", "train.eval_every = 0", "train.eval_batches = 2",
        "make_manager.save_every = 4", "make_optimizer.decay_steps = 4")


def _run(corpus, workdir, configs, *bindings):
  gin.clear_config()
  gin_utils.parse(configs + [TINY_GIN], corpus_bindings(corpus) + list(FAST) + list(bindings),
                  finalize=False)
  return training.train(str(workdir))


def _params(workdir):
  root = checkpointing.checkpoint_root(str(workdir))
  with ocp.CheckpointManager(root, item_names=("params",)) as manager:
    restored = manager.restore(manager.latest_step(),
                               args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(restored["params"])}


def _moved(before, after):
  """Parameters of both trees whose values differ."""
  return {k for k in after if k in before and not np.array_equal(before[k], after[k])}


def _train_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.fixture(scope="module", name="runs")
def _staged_runs(corpus, tmp_path_factory):
  root = tmp_path_factory.mktemp("informed")
  out = {"root": root}
  out["dense"] = _run(corpus, root / "dense", ["configs/dense.gin"])
  out["lff"] = _run(corpus, root / "lff", ["configs/informed_routing_lff.gin"],
                    f"train.init_checkpoint = '{root / 'dense'}'", "train.log_every = 1")
  out["router"] = _run(corpus, root / "router", ["configs/informed_routing.gin"],
                       f"train.init_checkpoint = '{root / 'lff'}'", "SPARSITY = 0.5")
  out["lora"] = _run(corpus, root / "lora", ["configs/informed_routing_lora.gin"],
                     f"train.init_checkpoint = '{root / 'router'}'", "SPARSITY = 0.5",
                     "LORA_RANK = 2")
  out["mod"] = _run(corpus, root / "mod", ["configs/mod.gin"],
                    f"train.init_checkpoint = '{root / 'dense'}'", "SPARSITY = 0.5")
  return out


def test_distillation_stage_trains_only_forecasters_and_keeps_the_dense_model(runs):
  root = runs["root"]
  dense, lff = _params(root / "dense"), _params(root / "lff")
  assert not _moved(dense, lff)  # the dense model is frozen
  # The forecasters (B starts at zero) and only they learnt; the routers keep their init.
  assert np.abs(lff["blocks/ffn/forecaster/up"]).sum() > 0
  assert set(lff) - set(dense) == {
      "blocks/ffn/forecaster/down", "blocks/ffn/forecaster/up", "blocks/ffn/router/hidden/bias",
      "blocks/ffn/router/hidden/kernel", "blocks/ffn/router/logits/bias",
      "blocks/ffn/router/logits/kernel", "blocks/ffn/causal/hidden/bias",
      "blocks/ffn/causal/hidden/kernel", "blocks/ffn/causal/logits/bias",
      "blocks/ffn/causal/logits/kernel", "blocks/ffn/causal_threshold"}
  # Sparsity 0: the model is the dense one, whatever the forecasters learnt.
  assert runs["lff"]["bits_per_byte"] == pytest.approx(runs["dense"]["bits_per_byte"], rel=1e-6)
  assert runs["lff"]["macs_per_token"] == runs["dense"]["macs_per_token"]
  losses = [r["aux_loss"] for r in _train_metrics(root / "lff")]
  assert losses[-1] < losses[0], losses


def test_router_stage_trains_only_routers_and_reports_the_routed_compute(runs):
  root = runs["root"]
  lff, router = _params(root / "lff"), _params(root / "router")
  moved = _moved(lff, router)
  # The routers, and the causal predictors with their thresholds (trained beside them).
  assert moved and all("/router/" in k or "/causal" in k for k in moved), moved
  assert "blocks/ffn/causal_threshold" in moved and "blocks/ffn/causal/logits/kernel" in moved
  # Half the tokens run the FFN, the others the forecaster; every token pays the router.
  ffn_part = 0.5 * 2 * D * F + 0.5 * 2 * D * R + (D * H + H * 2)
  expected = runs["dense"]["macs_per_token"] - L * 2 * D * F + L * ffn_part
  assert runs["router"]["macs_per_token"] == pytest.approx(expected, rel=1e-6)


def test_greedy_baseline_fine_tunes_everything_and_skips_half_the_ffn(runs):
  root = runs["root"]
  dense, mod = _params(root / "dense"), _params(root / "mod")
  assert not any("forecaster" in k for k in mod)
  assert any("/attn/" in k for k in _moved(dense, mod))
  ffn_part = 0.5 * 2 * D * F + (D * H + H)
  expected = runs["dense"]["macs_per_token"] - L * 2 * D * F + L * ffn_part
  assert runs["mod"]["macs_per_token"] == pytest.approx(expected, rel=1e-6)


def test_lora_stage_trains_only_the_adapters_and_pays_them_on_executed_tokens(runs):
  root = runs["root"]
  router, lora = _params(root / "router"), _params(root / "lora")
  assert set(lora) - set(router) == {f"blocks/ffn/{m}/{w}" for m in ("lora_wi", "lora_wo")
                                     for w in ("a", "b")}
  assert not _moved(router, lora)  # base, forecasters and routers as the router stage left them
  assert np.any(lora["blocks/ffn/lora_wi/b"]) and np.any(lora["blocks/ffn/lora_wo/b"])
  # Half the tokens execute, and those pay both rank-2 adapters: r (D + F) + r (F + D).
  adapters = 2 * (D + F) + 2 * (F + D)
  assert runs["lora"]["macs_per_token"] == pytest.approx(
      runs["router"]["macs_per_token"] + L * 0.5 * adapters, rel=1e-6)


def _script(*args):
  out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.mark.parametrize("run", ["router", "mod"])
def test_generate_decodes_routed_models_causally_with_every_prompt_whole(runs, run, tmp_path):
  prompts = tmp_path / "prompts.txt"
  lines = ["def main(argv):", "import os", "class A:\tpass  # three lengths"]
  prompts.write_text("\n".join(lines) + "\n")
  _script(os.path.join(REPO, "scripts", "generate.py"), f"--checkpoint_dir={runs['root'] / run}",
          f"--prompts={prompts}", "--max_new_tokens=6", f"--output={tmp_path / 'gen.jsonl'}")
  rows = [json.loads(l) for l in open(tmp_path / "gen.jsonl")]
  assert [r["prompt"] for r in rows] == lines
  eos = 258  # the byte tokenizer's
  for r in rows:
    assert len(r["ids"]) == len(r["logprobs"]) and 1 <= len(r["ids"]) <= 6
    assert len(r["ids"]) == 6 or r["ids"][-1] == eos  # stopped early only at EOS
    assert all(lp <= 0.0 for lp in r["logprobs"]) and r["macs_per_token"] > 0


def test_eval_reports_causal_routing_by_default_and_top_k_when_asked(runs, tmp_path):
  reports = {}
  for routing in ("causal", "topk"):
    output = tmp_path / f"{routing}.json"
    _script("eval.py", f"--checkpoint_dir={runs['root'] / 'router'}", f"--output={output}",
            *([] if routing == "causal" else ["--routing=topk"]))
    reports[routing] = json.loads(output.read_text())
  assert reports["causal"]["routing"] == "causal" and reports["topk"]["routing"] == "topk"
  # The top-k figure is the one training's own evaluation reported.
  assert reports["topk"]["bits_per_byte"] == pytest.approx(runs["router"]["bits_per_byte"],
                                                           rel=1e-5)
  assert 0.0 <= reports["topk"]["causal_topk_agreement"] <= 1.0
  assert reports["topk"]["topk_executed_fraction"] == pytest.approx(0.5)
  assert "causal_topk_agreement" not in reports["causal"]
