"""Evaluates a saved checkpoint: rebuilds the model from the gin config stored with it."""
import json
from typing import Optional

import gin
import jax
import flax.linen as nn
from etils import epath

from adacomp import checkpointing
from adacomp import kernels
from adacomp import sharding
from adacomp import tasks
from adacomp.metrics import ProgressBar
from adacomp.models.build import restore_sharded
from adacomp.training import make_eval_step
from layers.routing import routed_decisions


def report_name(split: str, step: int, eval_batches: Optional[int]) -> str:
  """The report's file name says what was evaluated, so a whole-split evaluation never
  overwrites a 32-batch one: eval_validation_step600_32batches.json, ..._all.json."""
  what = "all" if eval_batches is None else f"{eval_batches}batches"
  return f"eval_{split}_step{step}_{what}.json"


@gin.configurable(denylist=["checkpoint_dir", "meta", "step"])
def evaluate_checkpoint(checkpoint_dir: str, meta: dict, step: int, *,
                        split: str = "validation", batch_size: Optional[int] = None,
                        seq_len: Optional[int] = None, eval_batches: Optional[int] = -1,
                        output: Optional[str] = None) -> dict:
  """Loss, perplexity, bits per byte, token accuracy and MACs/token of a language model (top-1,
  compute fraction and images/s of an image classifier) on a split.

  Defaults repeat the training run's own evaluation (its batch size, sequence length and
  number of batches), so the figure matches the validation loss training reported.
  `eval_batches=None` (eval.py: `--eval_batches=all`) evaluates the whole split. The task is
  the run's `train.task`.
  """
  kernels.configure_kernels()
  task_name = meta.get("task", "lm")
  batch_size = batch_size or meta["batch_size"]
  seq_len = seq_len or meta.get("seq_len")
  eval_batches = meta.get("eval_batches") if eval_batches == -1 else eval_batches
  mesh = sharding.make_mesh()
  rules = sharding.logical_axis_rules()
  task = tasks.make_task(task_name, seq_len=seq_len)
  data = task.dataset(split, batch_size=batch_size, train=False, eval_max_batches=eval_batches)
  model = task.build_model(data)
  bar = ProgressBar(f"eval {split}")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = restore_sharded(checkpoint_dir, model, task.init_inputs(1), mesh, rules, step)
    summary = task.evaluate(jax.jit(make_eval_step(model, task=task)), params, data,
                            lambda b: sharding.global_batch(b, mesh),
                            progress=lambda i: bar(i, eval_batches))
  bar.close()
  report = {"checkpoint_dir": str(checkpoint_dir), "step": step, "split": split,
            "batch_size": batch_size, **({"seq_len": seq_len} if task_name == "lm" else {}),
            "eval_batches": eval_batches, "task": task_name, **summary}
  decisions = routed_decisions(model.config) if task_name == "lm" else {}
  if decisions:
    # 'causal': per-token decisions (reachable when generating); 'topk': teacher-forced.
    report["routing"] = "causal" if set(decisions.values()) == {"causal"} else "topk"
  report["summary_line"] = task.describe(summary)
  if output is None:
    output = str(checkpointing.checkpoint_root(checkpoint_dir).parent /
                 report_name(split, step, eval_batches))
  if jax.process_index() == 0:
    epath.Path(output).write_text(json.dumps(report, indent=2))
  report["output"] = output
  return report
