"""The training loop every method shares (`train.py` calls `train`).

gin -> mesh, input pipeline, model, optax optimizer, sharded train state, orbax manager; then
`num_steps` jit-compiled steps with periodic evaluation, metrics to stdout / JSONL / TensorBoard,
and checkpoints that include the input iterator's position, so a restarted run continues the same
data stream and ends on the same parameters as an uninterrupted one.

The step's loss is the task's cross-entropy plus every scalar a layer sows into the `losses`
collection (router, budget and distillation terms of the adaptive methods).

`train.task` picks what is trained: 'lm' (next-token prediction, the default) or
'image_classification' (ViT); the per-task pieces (data, model, batch sums, summaries) live in
`adacomp.tasks`, the loop itself is shared.
"""
import math
import re
import time
from typing import Any, Optional, Tuple

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from adacomp import checkpointing
from adacomp import kernels
from adacomp import metrics as metrics_lib
from adacomp import sharding
from adacomp import tasks
from adacomp.models.decoder import DecoderConfig

RNG_STREAMS = ("dropout", "routing")


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite; no checkpoint was written after it happened."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@gin.configurable
def make_optimizer(num_steps: int, *, learning_rate: float = 3e-3, warmup_steps: int = 100,
                   schedule: str = "cosine", decay_steps: Optional[int] = None,
                   end_lr_fraction: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, weight_decay: float = 0.1,
                   grad_clip_norm: Optional[float] = 1.0,
                   trainable: Optional[str] = None) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine/linear decay or a constant rate.

  `decay_steps` defaults to the run's `num_steps`; fix it when a run is split into parts so that
  every part sees the same schedule. Norm scales and AS-ViT's pruning thresholds are not
  weight-decayed.

  `trainable`: a regular expression searched in each parameter's path ("blocks/ffn/router/w");
  parameters that do not match are frozen (zero update, no optimizer state, outside the clipped
  norm). None trains everything. Staged methods (Duo's router stage, informed routing) use it.
  """
  decay_steps = num_steps if decay_steps is None else decay_steps
  after = max(decay_steps - warmup_steps, 1)
  if schedule == "cosine":
    decay = optax.cosine_decay_schedule(learning_rate, after, alpha=end_lr_fraction)
  elif schedule == "linear":
    decay = optax.linear_schedule(learning_rate, learning_rate * end_lr_fraction, after)
  elif schedule == "constant":
    decay = optax.constant_schedule(learning_rate)
  else:
    raise ValueError(f"make_optimizer.schedule={schedule!r}; use 'cosine', 'linear' or "
                     f"'constant'.")
  lr = optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])

  def decay_mask(params):
    def decayed(path, _):
      keys = [str(getattr(k, "key", "")) for k in path]
      # AS-ViT's pruning thresholds (pruner_*/threshold) are not decayed, as in the released
      # code's no_weight_decay(): decay would pull every threshold toward keeping all tokens.
      if keys and keys[-1] == "threshold" and any(k.startswith("pruner_") for k in keys):
        return False
      return not any("norm" in k or k == "scale" for k in keys)
    return jax.tree_util.tree_map_with_path(decayed, params)

  chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
  chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  tx = optax.chain(*chain)
  if trainable is None:
    return tx
  pattern = re.compile(trainable)

  def labels(params):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    if not any(pattern.search(path) for path in flat):
      raise ValueError(
          f"make_optimizer.trainable={trainable!r} matches no parameter, so nothing would train. "
          f"Parameter paths look like {sorted(flat)[:4]}; fix the expression.")
    return flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")): ("train" if pattern.search(k) else "frozen") for k in flat})

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def trainable_mask(tx_trainable: Optional[str], params):
  """Bool tree: which parameters `make_optimizer.trainable` lets train (all when None)."""
  if tx_trainable is None:
    return jax.tree.map(lambda _: True, params)
  pattern = re.compile(tx_trainable)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split("/")): bool(pattern.search(k)) for k in flat})


def sum_sown(tree) -> jax.Array:
  """Sum of every scalar sown into a collection (losses), 0.0 when there are none."""
  leaves = jax.tree.leaves(tree)
  return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                    layer_mask: Optional[np.ndarray] = None, task_loss_weight: float = 1.0,
                    grad_mask=None, task=None):
  """One optimizer step. The objective is task_loss_weight * cross-entropy + sown losses;
  `grad_mask` (bool tree, trainable parameters) restricts the reported gradient norm.
  `task` (adacomp.tasks) defaults to language modelling with `layer_mask`."""
  base_key = jax.random.key(seed)
  task = tasks.LanguageModeling(layer_mask=layer_mask) if task is None else task

  def train_step(state: TrainState, batch):
    step_key = jax.random.fold_in(base_key, state.step)
    rngs = {name: jax.random.fold_in(step_key, i) for i, name in enumerate(RNG_STREAMS)}

    def loss_fn(params):
      logits, mutables = model.apply({"params": params}, batch["inputs"], rngs=rngs,
                                     mutable=["losses"], **task.apply_kwargs(train=True))
      sums = task.batch_sums(logits, batch)
      ce = sums["nats"] / jnp.maximum(sums["weights"], 1.0)
      aux = sum_sown(mutables.get("losses", {}))
      return task_loss_weight * ce + aux, (sums, ce, aux)

    grads, (sums, ce, aux) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    shown = grads if grad_mask is None else jax.tree.map(
        lambda g, m: g if m else jnp.zeros((), g.dtype), grads, grad_mask)
    metrics = {"loss": ce, "aux_loss": aux, "grad_norm": optax.tree.norm(shown),
               **task.step_metrics(sums),
               # Checked before every save: a finite loss computed from the old params does not
               # make the updated params finite.
               "params_finite": jnp.all(jnp.stack(
                   [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])).astype(
                       jnp.float32)}
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, layer_mask: Optional[np.ndarray] = None, task=None):
  """Sums one evaluation batch contributes (`task` defaults to language modelling)."""
  task = tasks.LanguageModeling(layer_mask=layer_mask) if task is None else task

  def eval_step(params, batch):
    logits, mutables = model.apply({"params": params}, batch["inputs"],
                                   mutable=["intermediates"], **task.apply_kwargs(train=False))
    sums = task.batch_sums(logits, batch)
    sums.update(task.compute_sums(mutables.get("intermediates", {}), batch))
    return sums

  return eval_step


def init_train_state(model: nn.Module, tx, seq_len: int, seed: int, mesh, rules, task=None):
  """Sharded train state initialised under jit, and its (unboxed) abstract shape. The dummy
  input is `task.init_inputs` (token ids of length seq_len when no task is given)."""

  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  inputs = (jnp.zeros((batch_shards, seq_len), jnp.int32) if task is None
            else task.init_inputs(batch_shards))

  def init_fn(key):
    variables = model.init(key, inputs)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  key = jax.random.key(seed)
  boxed = jax.eval_shape(init_fn, key)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  state = jax.jit(lambda k: sharding.strip_boxes(init_fn(k)), out_shardings=shardings)(key)
  abstract = sharding.abstract_with_shardings(boxed, shardings)
  return state, abstract, shardings


def _check_finite(step: int, host_metrics: dict, manager) -> None:
  loss = host_metrics["loss"]
  if not math.isfinite(loss) or not host_metrics["params_finite"]:
    what = (f"Loss is {loss}" if not math.isfinite(loss) else
            f"The parameters became NaN or infinite (loss {loss:.4g})")
    manager.wait_until_finished()
    latest = manager.latest_step()
    kept = (f"The last good checkpoint (step {latest}) in {manager.directory} is kept "
            f"untouched." if latest is not None else "No checkpoint had been saved yet.")
    raise TrainingDivergedError(
        f"{what} at step {step}: training diverged. {kept} Lower the learning rate "
        f"(make_optimizer.learning_rate), lengthen warm-up (make_optimizer.warmup_steps) or "
        f"clip gradients (make_optimizer.grad_clip_norm), then rerun: it resumes from there.")


def _flops(compiled) -> Optional[float]:
  """FLOPs of one compiled step as XLA counts them (None where the backend does not say)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float((cost or {}).get("flops", 0.0)) or None


def _bound(name: str) -> bool:
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@gin.configurable
def stage_input(stage: str = gin.REQUIRED):
  """A stage config's `train.init_checkpoint = @stage_input()`: called only when the user did not
  pass the earlier stage's workdir, it says which one to pass."""
  raise ValueError(
      f"train.init_checkpoint is required by this stage config: pass the --workdir of {stage}, "
      f"as --gin_bindings=\"train.init_checkpoint='/path/to/that/workdir'\".")


@gin.configurable(denylist=["workdir"])
def train(workdir: str, *, num_steps: int = gin.REQUIRED, batch_size: int = 16,
          seq_len: int = 256, seed: int = 0, log_every: int = 50, eval_every: int = 500,
          eval_batches: Optional[int] = 32, peak_flops_per_device: Optional[float] = None,
          model_config: Optional[DecoderConfig] = None,
          init_checkpoint: Optional[str] = None, task_loss_weight: float = 1.0,
          task: str = "lm", profile_steps: Optional[Tuple[int, int]] = None) -> dict:
  """Trains the gin-configured model in `workdir`; returns the final evaluation summary.

  `init_checkpoint` (a workdir or its checkpoints/ folder) starts a new run from another run's
  params with a fresh optimizer (fine-tuning); parameters the checkpoint lacks (a Duo model's
  small FFN and router when starting from a dense run) keep their fresh init; a run that already has checkpoints of its own
  resumes from them instead. `task_loss_weight` scales the cross-entropy (0 trains on the sown
  losses alone, e.g. distillation stages); `make_optimizer.trainable` freezes parameters.
  `task`: 'lm' or 'image_classification' (adacomp.tasks); `seq_len` and `model_config` (a
  DecoderConfig) are language-model settings, the ViT is configured through ViTConfig.
  `profile_steps=(start, stop)` writes a jax.profiler trace of steps start..stop-1 into
  `<workdir>/profile` (open it with TensorBoard's profile plugin or Perfetto).
  The returned summary also names the run's `checkpoint_dir`.
  """
  workdir_path = checkpointing.ensure_writable(workdir)
  kernels.configure_kernels()
  task_obj = tasks.make_task(task, seq_len=seq_len, model_config=model_config)
  task_obj.check()

  mesh = sharding.make_mesh()
  rules = sharding.logical_axis_rules()
  train_data = task_obj.dataset("train", batch_size=batch_size, train=True, seed=seed)
  model = task_obj.build_model(train_data)
  tx = make_optimizer(num_steps)
  manager = checkpointing.make_manager(str(workdir_path))
  config_str = gin.config_str()
  if jax.process_index() == 0:
    (workdir_path / "config.gin").write_text(config_str)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, abstract, state_sharding = init_train_state(model, tx, seq_len, seed, mesh, rules,
                                                       task=task_obj)
    train_iter = iter(train_data)
    start_step = 0
    latest = manager.latest_step()
    if latest is not None:
      params, opt_state, _ = checkpointing.restore(manager, latest, abstract, train_iter)
      state = state.replace(step=jnp.asarray(latest, jnp.int32), params=params,
                            opt_state=opt_state)
      start_step = latest
      print(f"Resuming from checkpoint step {latest} in {manager.directory}", flush=True)
    elif init_checkpoint:
      params, new, unused = checkpointing.init_params_from(init_checkpoint, state.params)
      state = state.replace(params=params)
      print(f"Initialised params from {init_checkpoint}" +
            (f"; {len(new)} new parameter(s) keep their init: {', '.join(new[:6])}"
             f"{' ...' if len(new) > 6 else ''}" if new else "") +
            (f"; {len(unused)} checkpoint parameter(s) unused: {', '.join(unused[:6])}"
             f"{' ...' if len(unused) > 6 else ''}" if unused else ""), flush=True)
    if latest is None:
      print(f"Model: {count_params(state.params):,} parameters; mesh "
            f"{dict(mesh.shape)}; {jax.device_count()} device(s), "
            f"{jax.process_count()} process(es)", flush=True)

    grad_mask = trainable_mask(gin.query_parameter("make_optimizer.trainable")
                               if _bound("make_optimizer.trainable") else None, state.params)
    if not all(jax.tree.leaves(grad_mask)):
      frozen = count_params(state.params) - sum(
          int(np.prod(x.shape)) for x, m in zip(jax.tree.leaves(state.params),
                                                jax.tree.leaves(grad_mask)) if m)
      print(f"Training {count_params(state.params) - frozen:,} parameters; {frozen:,} frozen "
            f"(make_optimizer.trainable)", flush=True)
    step_fn = jax.jit(make_train_step(model, tx, seed, None, task_loss_weight, grad_mask,
                                      task=task_obj),
                      donate_argnums=0,
                      out_shardings=(state_sharding, None))
    eval_fn = jax.jit(make_eval_step(model, task=task_obj))
    writer = metrics_lib.MetricWriter(str(workdir_path), num_steps)
    meta = {"gin_config": config_str, "batch_size": batch_size, "eval_batches": eval_batches,
            **task_obj.meta(model)}

    def run_eval(step):
      data = task_obj.dataset("validation", batch_size=batch_size, train=False,
                              eval_max_batches=eval_batches)
      summary = task_obj.evaluate(eval_fn, state.params, data,
                                  lambda b: sharding.global_batch(b, mesh))
      writer.write(step, "validation", summary)
      print(f"  eval @ step {step}: {task_obj.eval_line(summary)}", flush=True)
      return summary

    compiled_step, flops_per_step = None, None
    # Timing bookkeeping: a window runs from one progress line to the next. Steps are dispatched
    # asynchronously, so the window's wall time is only meaningful once its metrics have been
    # fetched (device_get below waits for them); evaluation and checkpointing inside a window are
    # timed separately (`paused`) and subtracted, so ms/step and TFLOP/s measure training alone.
    pending, window_start, window_steps, paused = [], time.time(), 0, 0.0
    summary = None
    step = start_step
    profile_dir = str(workdir_path / "profile")
    for step in range(start_step + 1, num_steps + 1):
      batch = sharding.global_batch(next(train_iter), mesh)
      if compiled_step is None:
        # Compile outside the first window, so that window's ms/step is not the compile time.
        compiled_step = step_fn.lower(state, batch).compile()
        flops_per_step = _flops(compiled_step)
        window_start = time.time()
      if profile_steps and step == profile_steps[0]:
        jax.profiler.start_trace(profile_dir)
      state, step_metrics = compiled_step(state, batch)
      if profile_steps and step == profile_steps[1] - 1:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        print(f"  profile of steps {profile_steps[0]}..{step} written to {profile_dir} "
              f"(tensorboard --logdir {profile_dir})", flush=True)
      pending.append(step_metrics)
      window_steps += 1
      last = step == num_steps
      if step % log_every == 0 or last or manager.should_save(step):
        host = jax.device_get(pending)
        pending = []
        for offset, m in enumerate(host):
          _check_finite(step - len(host) + 1 + offset, {k: float(v) for k, v in m.items()},
                        manager)
        if step % log_every == 0 or last:
          elapsed = max(time.time() - window_start - paused, 1e-9)
          scalars = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
          count = float(sum(m[task_obj.unit] for m in host))
          scalars.update({"step_ms": 1000 * elapsed / window_steps,
                          f"{task_obj.unit}_per_s": count / elapsed})
          if flops_per_step:
            scalars["tflops_per_s"] = flops_per_step * window_steps / elapsed / 1e12
            if peak_flops_per_device:
              scalars["mfu"] = scalars["tflops_per_s"] * 1e12 / (
                  peak_flops_per_device * jax.local_device_count())
          writer.write(step, "train", scalars)
          writer.progress(step, scalars, start_step)
          window_start, window_steps, paused = time.time(), 0, 0.0
      side_start = time.time()
      if (eval_every and step % eval_every == 0) or last:
        summary = run_eval(step)
      checkpointing.save(manager, step, state, train_iter, meta, force=last)
      paused += time.time() - side_start
    if summary is None:
      summary = run_eval(step)
    manager.wait_until_finished()
    manager.close()
    writer.close()
  logging.info("Training finished at step %d", step)
  return dict(summary, checkpoint_dir=str(manager.directory))
