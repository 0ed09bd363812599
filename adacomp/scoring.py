"""Evaluation shared by training's periodic eval and `eval.py` (language models, classifiers).

Sums are accumulated per batch on device and in float64 on the host, so the same params and the
same split give the same numbers whichever entry point asks.
"""
import math
from typing import Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

LN2 = math.log(2.0)


def token_sums(logits, batch):
  """Weighted sums over a batch: nats, weights, correct predictions and target bytes."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["targets"])
  w = batch["weights"].astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  return {
      "nats": jnp.sum(losses * w),
      "weights": jnp.sum(w),
      "correct": jnp.sum(correct * w),
      "bytes": jnp.sum(batch["target_bytes"].astype(jnp.float32) * w),
  }


def classification_sums(logits, batch):
  """Weighted sums over a batch of images: nats, weights (images) and correct top-1."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["targets"])
  w = batch["weights"].astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  return {"nats": jnp.sum(losses * w), "weights": jnp.sum(w), "correct": jnp.sum(correct * w)}


def summarize_classification(sums: dict, dense_macs_per_image=None) -> dict:
  """Loss, top-1 accuracy, MACs per image, compute fraction of the dense model (when its MACs
  are given) and the mean kept token fraction of each pruning stage."""
  images = max(sums["weights"], 1.0)
  summary = {"loss": sums["nats"] / images, "accuracy": sums["correct"] / images,
             "num_images": sums["weights"]}
  if "macs" in sums:
    summary["macs_per_image"] = sums["macs"] / images
    if dense_macs_per_image:
      summary["compute_fraction"] = summary["macs_per_image"] / dense_macs_per_image
  for key in sums:
    if key.startswith("kept_stage"):
      summary[key] = sums[key] / images
  return summary


def summarize(sums: dict) -> dict:
  """Loss, perplexity, bits per byte and token accuracy from accumulated sums."""
  weights = max(sums["weights"], 1.0)
  loss = sums["nats"] / weights
  summary = {
      "loss": loss,
      "perplexity": math.exp(min(loss, 700.0)),
      "bits_per_byte": sums["nats"] / LN2 / max(sums["bytes"], 1.0),
      "token_accuracy": sums["correct"] / weights,
      "num_tokens": sums["weights"],
  }
  if "macs" in sums:
    summary["macs_per_token"] = sums["macs"] / weights
  if sums.get("routing_decisions"):
    summary["causal_topk_agreement"] = sums["routing_agree"] / sums["routing_decisions"]
    summary["causal_executed_fraction"] = sums["routing_causal"] / sums["routing_decisions"]
    summary["topk_executed_fraction"] = sums["routing_topk"] / sums["routing_decisions"]
  return summary


def evaluate(eval_step: Callable, params, batches: Iterable[dict], to_device: Callable,
             progress: Callable[[int], None] = lambda i: None,
             summarize_fn: Callable[[dict], dict] = summarize) -> dict:
  """Runs `eval_step(params, batch) -> sums` over `batches` and summarises."""
  totals = None
  for i, batch in enumerate(batches):
    sums = jax.device_get(eval_step(params, to_device(batch)))
    sums = {k: np.float64(v) for k, v in sums.items()}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    progress(i + 1)
  if totals is None:
    raise ValueError("The evaluation split yielded no batches; check the dataset and split.")
  return summarize_fn(totals)


def routing_sums(intermediates, weights) -> dict:
  """Routed units in "topk" mode sow `executed` (the top-k decision) and `causal_executed`
  (what the causal predictor would decide): counts over the weighted tokens of every routed
  unit of the decisions, the agreements and each side's executed tokens ({} without them)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  sums = {}
  for path, causal in flat.items():
    if path[-1] != "causal_executed":
      continue
    for c, e in zip(causal, flat[path[:-1] + ("executed",)]):
      w = jnp.broadcast_to(weights.astype(jnp.float32), c.shape)
      c, e = c.astype(jnp.float32), e.astype(jnp.float32)
      for key, value in (("routing_decisions", w), ("routing_agree", w * (c == e)),
                         ("routing_causal", w * c), ("routing_topk", w * e)):
        sums[key] = sums.get(key, 0.0) + jnp.sum(value)
  return sums


def macs_per_token(intermediates, shape, layer_mask=None) -> jax.Array:
  """Adds up every sown `macs` array into one [batch, length] array.

  With a layer mask (SkipDecode schedules), a block's MACs count only at the tokens for which
  the block is active: what the schedule spends at inference, although the masked training
  forward pass computes every layer.
  """
  total = jnp.zeros(shape, jnp.float32)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  mask = None if layer_mask is None else jnp.asarray(layer_mask, jnp.float32)
  for path, values in flat.items():
    if path[-1] != "macs":
      continue
    for v in values:
      if mask is not None and path[0] == "blocks":  # scanned: [layers, batch, length]
        v = v * (mask[:, None, :] if mask.ndim == 2 else mask)
      elif mask is not None and path[0].startswith("block_"):
        layer = mask[int(path[0].split("_")[1])]
        v = v * layer
      total = total + jnp.sum(v.reshape((-1,) + shape), axis=0)
  return total
