"""End to end: train a tiny dense ViT on digits, fine-tune AS-ViT from it, evaluate both."""
import json

import gin
import pytest

from adacomp import checkpointing, evaluation, gin_utils, training

TINY = [
    "train.task = 'image_classification'",
    "train.num_steps = 30", "train.batch_size = 32", "train.log_every = 10",
    "train.eval_every = 0", "train.eval_batches = 3",
    "ViTConfig.image_size = 32", "ViTConfig.patch_size = 8", "ViTConfig.num_layers = 3",
    "ViTConfig.d_model = 32", "ViTConfig.num_heads = 2", "ViTConfig.head_dim = 16",
    "ViTConfig.d_ff = 64",
    "make_optimizer.learning_rate = 3e-3", "make_optimizer.warmup_steps = 5",
    "make_manager.save_every = 30",
]
PRUNING = [
    "ViTConfig.prune_after = (1, 2)", "ViTConfig.threshold_init = (0.005, 0.01)",
    "ViTConfig.budget_ratio = 0.4",
    "train.num_steps = 25", "make_optimizer.learning_rate = 3e-3",
    "make_optimizer.warmup_steps = 0", "make_optimizer.schedule = 'constant'",
]


def _train(workdir, data_dir, *bindings):
  gin.clear_config()
  gin_utils.parse([], TINY + [f"image_dataset.data_dir = '{data_dir}'"] + list(bindings),
                  finalize=False)
  return training.train(str(workdir))


def test_as_vit_fine_tuned_from_the_dense_vit_moves_its_compute_toward_the_budget(tmp_path):
  # One test, not two sharing a fixture: pytest-xdist would run the dense fixture per worker.
  data_dir = str(tmp_path / "tfds")
  dense = _train(tmp_path / "dense", data_dir)
  records = [json.loads(l) for l in open(tmp_path / "dense" / "metrics.jsonl")]
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert losses[-1] < losses[0], losses
  assert dense["compute_fraction"] == pytest.approx(1.0)
  assert {"images_per_s", "accuracy", "loss", "num_images"} <= set(dense)

  summary = _train(tmp_path / "as_vit", data_dir, *PRUNING,
                   f"train.init_checkpoint = '{tmp_path / 'dense'}'")
  records = [json.loads(l) for l in open(tmp_path / "as_vit" / "metrics.jsonl")]
  aux_losses = [r["aux_loss"] for r in records if r["split"] == "train"]
  # The sown budget (+ distillation, 0 at the start) term falls ...
  assert aux_losses[-1] < aux_losses[0], aux_losses
  # ... and from the dense checkpoint (compute fraction ~1 with the tiny initial thresholds)
  # the pruned model's compute moves toward rho = 0.4.
  assert summary["compute_fraction"] < 0.85, summary
  assert summary["kept_stage0"] >= summary["kept_stage1"]
  # Per-batch k over 3 full batches of 32: at stage 0 (the same tokens as the exact model) the
  # mean of floor(kept tokens in a batch / 32) is within one token under the mean kept count
  # (16 image tokens of 8x8 patches); stage 1 sees only stage 0's k tokens per image.
  gap = summary["kept_stage0"] * 16 - summary["batch_k_stage0"]
  assert 0.0 <= gap < 1.0 + 1e-6, summary
  assert summary["batch_k_stage1"] <= summary["batch_k_stage0"]
  assert 0.0 <= summary["accuracy_batch_k"] <= 1.0

  gin.clear_config()
  step, meta = checkpointing.read_meta(str(tmp_path / "as_vit"))
  gin.parse_config(meta["gin_config"])
  report = evaluation.evaluate_checkpoint(str(tmp_path / "as_vit"), meta, step)
  assert report["task"] == "image_classification"
  assert report["compute_fraction"] == pytest.approx(summary["compute_fraction"], rel=1e-6)
  assert report["accuracy"] == pytest.approx(summary["accuracy"])
  assert "top-1" in report["summary_line"]


def test_pruning_thresholds_are_not_weight_decayed_and_the_other_weights_are():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from adacomp.models.vit import ViT, ViTConfig  # pylint: disable=g-import-not-at-top
  cfg = ViTConfig(image_size=16, patch_size=4, channels=1, num_classes=3, num_layers=3,
                  d_model=16, num_heads=2, head_dim=8, d_ff=32, prune_after=(1, 2),
                  threshold_init=(0.01, 0.02))
  # Every weight 0.5 (norm scales and biases too, so that "not decayed" is not trivially 0).
  params = jax.tree.map(lambda a: jnp.full(a.shape, 0.5, a.dtype), jax.eval_shape(
      ViT(cfg).init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"])
  params = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, params,
                        is_leaf=lambda a: hasattr(a, "value"))
  tx = training.make_optimizer(10, learning_rate=1.0, warmup_steps=0, schedule="constant",
                               weight_decay=0.5, grad_clip_norm=None)
  # Zero gradients: Adam's step is 0, so every change is the decoupled decay -lr * wd * w.
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for stage in ("pruner_0", "pruner_1"):
    assert float(updates[stage]["threshold"]) == 0.0
  np.testing.assert_allclose(updates["block_0"]["wi"], -0.5 * params["block_0"]["wi"], rtol=1e-6)
  np.testing.assert_array_equal(updates["block_0"]["attn_norm"]["scale"], 0.0)
