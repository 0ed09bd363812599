"""What the shared training loop and evaluation need to know about a task (`train.task`).

`training.train` and `evaluation.evaluate_checkpoint` are task-agnostic; a task object supplies
the per-task pieces:

  check()                     configuration errors found before any work starts
  dataset(split, ...)         the input pipeline for a split (a checkpointable iterator)
  build_model(data)           the gin-configured model, sized from the dataset
  init_inputs(rows)           a dummy input batch for `model.init`
  apply_kwargs(train)         extra keyword arguments of `model.apply`
  batch_sums(logits, batch)   weighted sums a batch contributes: nats, weights, correct, ...
  compute_sums(inter, batch)  weighted sums of the sown compute (`macs`, kept tokens)
  step_metrics(sums)          task metrics of a training step; `unit` names its throughput count
  evaluate(...), summarize()  an evaluation pass and its summary from accumulated sums
  eval_line / describe        training's eval line / eval.py's one-line summary
  meta(model)                 what the checkpoint records for evaluation

Two tasks: 'lm' (next-token prediction, the default; behaviour unchanged from before tasks
existed) and 'image_classification' (ViT on image datasets).
"""
import time
from typing import Callable, Optional

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np

from adacomp import data as data_lib
from adacomp import scoring
from adacomp.models import build
from adacomp.models import decoder as decoder_lib
from adacomp.models import vit as vit_lib

TASKS = ("lm", "image_classification")


@gin.configurable
def position_layer_mask(seq_len: int, num_layers: int, *,
                        fn: Optional[Callable[[int, int], np.ndarray]] = None
                        ) -> Optional[np.ndarray]:
  """Bool [num_layers, seq_len]: which layers run at each position, or None (every layer).

  A method's hook into the shared language-model task: SkipDecode binds
  `position_layer_mask.fn = @layer_mask_for_training` (adacomp/methods/skipdecode), so training
  and evaluation run each position on its scheduled layers only. The core never imports it.
  """
  return None if fn is None else fn(seq_len, num_layers)


class LanguageModeling:
  """Packed next-token prediction on a text corpus (`lm_dataset`, `DecoderLM`)."""
  name = "lm"
  unit = "tokens"

  def __init__(self, seq_len: int = 256, model_config=None, layer_mask=None):
    self.seq_len, self.model_config, self.layer_mask = seq_len, model_config, layer_mask

  def check(self) -> None:
    cfg = decoder_lib.DecoderConfig() if self.model_config is None else self.model_config
    if self.seq_len > cfg.max_len:
      raise ValueError(
          f"train.seq_len={self.seq_len} exceeds the model's DecoderConfig.max_len="
          f"{cfg.max_len}; lower train.seq_len or raise DecoderConfig.max_len.")

  def dataset(self, split, *, batch_size, train, seed=0, eval_max_batches=None):
    return data_lib.lm_dataset(split, batch_size=batch_size, seq_len=self.seq_len, train=train,
                               seed=seed, eval_max_batches=eval_max_batches)

  def build_model(self, data):
    model = build.build_decoder(data.tokenizer.vocab_size, self.model_config)
    self.layer_mask = position_layer_mask(self.seq_len, model.config.num_layers)
    return model

  def init_inputs(self, rows: int):
    return jnp.zeros((rows, self.seq_len), jnp.int32)

  def apply_kwargs(self, train: bool) -> dict:
    del train
    return {"layer_mask": self.layer_mask}

  def batch_sums(self, logits, batch):
    return scoring.token_sums(logits, batch)

  def compute_sums(self, intermediates, batch) -> dict:
    macs = scoring.macs_per_token(intermediates, batch["inputs"].shape, self.layer_mask)
    return {"macs": jnp.sum(macs * batch["weights"]),
            **scoring.routing_sums(intermediates, batch["weights"])}

  def step_metrics(self, sums) -> dict:
    return {"bits_per_byte": sums["nats"] / scoring.LN2 / jnp.maximum(sums["bytes"], 1.0),
            "tokens": sums["weights"]}

  def evaluate(self, eval_step, params, batches, to_device, progress=lambda i: None):
    return scoring.evaluate(eval_step, params, batches, to_device, progress)

  def summarize(self, sums) -> dict:
    return scoring.summarize(sums)

  def eval_line(self, summary) -> str:
    return (f"loss {summary['loss']:.4f} | bits/byte {summary['bits_per_byte']:.4f} | "
            f"token acc {summary['token_accuracy']:.3f} | {int(summary['num_tokens']):,} tokens")

  def describe(self, summary) -> str:
    line = (f"loss {summary['loss']:.4f} | perplexity {summary['perplexity']:.3f} | bits/byte "
            f"{summary['bits_per_byte']:.4f} | token accuracy {summary['token_accuracy']:.4f}")
    if "macs_per_token" in summary:
      line += f" | {summary['macs_per_token'] / 1e6:.3f} MMACs/token"
    return line + f" | {int(summary['num_tokens']):,} tokens"

  def meta(self, model) -> dict:
    return {"seq_len": self.seq_len, "vocab_size": model.config.vocab_size}


class ImageClassification:
  """Image classification with the ViT (`image_dataset`, `adacomp.models.vit`).

  Evaluation runs the hard-threshold inference path (exact per-image pruning decisions) and
  reports top-1 accuracy, loss, the compute fraction (sown MACs over the dense ViT's) and the
  kept token fraction per pruning stage; images/s is timed over the evaluation batches after
  the first (which compiles). With pruning stages (and one process), every batch also runs the
  released code's batched inference (`vit.batch_k_apply`: k_s = floor(total kept in the batch
  / B) tokens per image), reported as `accuracy_batch_k` and the mean `batch_k_stage{s}`.
  """
  name = "image_classification"
  unit = "images"

  def __init__(self, model_config: Optional[vit_lib.ViTConfig] = None):
    self.model_config = model_config
    self.dense_macs = None

  def check(self) -> None:
    pass

  def dataset(self, split, *, batch_size, train, seed=0, eval_max_batches=None):
    return data_lib.image_dataset(split, batch_size=batch_size, train=train, seed=seed,
                                  eval_max_batches=eval_max_batches)

  def build_model(self, data):
    model = vit_lib.build_vit(data.channels, data.num_classes, self.model_config)
    model.config.validate()
    self.dense_macs = vit_lib.dense_macs_per_image(model.config)
    self.model = model
    self.image_shape = (data.image_size, data.image_size, data.channels)
    return model

  def init_inputs(self, rows: int):
    return jnp.zeros((rows,) + self.image_shape, jnp.float32)

  def apply_kwargs(self, train: bool) -> dict:
    return {"train": True} if train else {}

  def batch_sums(self, logits, batch):
    return scoring.classification_sums(logits, batch)

  def compute_sums(self, intermediates, batch) -> dict:
    """Weighted sums of per-image MACs and of each stage's kept token fraction."""
    per_image = jnp.zeros(batch["weights"].shape, jnp.float32)
    kept = {}
    for path, values in flax.traverse_util.flatten_dict(
        flax.core.unfreeze(intermediates)).items():
      for v in values:
        if path[-1] == "macs":
          per_image = per_image + jnp.sum(v.reshape(v.shape[0], -1), axis=-1)
        elif path[-1].startswith("kept_stage"):
          kept[path[-1]] = jnp.sum(v * batch["weights"])
    return {"macs": jnp.sum(per_image * batch["weights"]), **kept}

  def step_metrics(self, sums) -> dict:
    return {"accuracy": sums["correct"] / jnp.maximum(sums["weights"], 1.0),
            "images": sums["weights"]}

  def evaluate(self, eval_step, params, batches, to_device, progress=lambda i: None):
    times, counts, batch_k = [], [], []
    run_batch_k = (getattr(self, "model", None) is not None and
                   bool(self.model.config.prune_after) and jax.process_count() == 1)

    def timed(p, batch):
      start = time.perf_counter()
      sums = jax.block_until_ready(eval_step(p, batch))
      times.append(time.perf_counter() - start)
      counts.append(float(np.sum(batch["weights"])))
      if run_batch_k:
        weights = np.asarray(batch["weights"])
        logits, ks = vit_lib.batch_k_apply(self.model, p, batch["inputs"], weights=weights)
        correct = np.sum((np.argmax(np.asarray(logits), -1) == np.asarray(batch["targets"]))
                         * weights)
        batch_k.append((float(correct), ks))
      return sums

    summary = scoring.evaluate(timed, params, batches, to_device, progress,
                                  summarize_fn=self.summarize)
    if len(times) > 1:
      summary["images_per_s"] = sum(counts[1:]) / max(sum(times[1:]), 1e-9)
    if batch_k:
      summary["accuracy_batch_k"] = sum(c for c, _ in batch_k) / max(sum(counts), 1.0)
      for s, ks in enumerate(zip(*(k for _, k in batch_k))):
        summary[f"batch_k_stage{s}"] = float(np.mean(ks))
    return summary

  def summarize(self, sums) -> dict:
    return scoring.summarize_classification(sums, self.dense_macs)

  def describe(self, summary) -> str:
    line = (f"loss {summary['loss']:.4f} | top-1 {summary['accuracy']:.4f} | compute "
            f"{summary.get('compute_fraction', float('nan')):.3f} of dense")
    kept = [summary[k] for k in sorted(summary) if k.startswith("kept_stage")]
    if kept:
      line += " | kept tokens " + "/".join(f"{k:.2f}" for k in kept)
    if "accuracy_batch_k" in summary:
      ks = [summary[k] for k in sorted(summary) if k.startswith("batch_k_stage")]
      line += (f" | per-batch k {'/'.join(f'{k:.1f}' for k in ks)}: top-1 "
               f"{summary['accuracy_batch_k']:.4f}")
    if "images_per_s" in summary:
      line += f" | {summary['images_per_s']:,.0f} images/s"
    return line + f" | {int(summary['num_images']):,} images"

  def eval_line(self, summary) -> str:
    return self.describe(summary)

  def meta(self, model) -> dict:
    return {"task": self.name, "num_classes": model.config.num_classes,
            "channels": model.config.channels}


def make_task(name: str, *, seq_len: int = 256, model_config=None):
  """The task object for `train.task`."""
  if name == "lm":
    return LanguageModeling(seq_len, model_config)
  if name == "image_classification":
    return ImageClassification(model_config)
  raise ValueError(f"train.task={name!r}; use one of {TASKS}.")
