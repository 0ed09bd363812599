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
import errno
import math
import re
import statistics
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
from etils import epath

from adacomp import arguments
from adacomp import checkpointing
from adacomp import kernels
from adacomp import metrics as metrics_lib
from adacomp import sharding
from adacomp import tasks
from adacomp.models.decoder import DecoderConfig

RNG_STREAMS = ("dropout", "routing")


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN, infinite or spiked; no checkpoint was written after it happened."""


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
  arguments.check_rate("make_optimizer.learning_rate", learning_rate)
  arguments.check_int("make_optimizer.warmup_steps", warmup_steps, 0)
  arguments.check_optional_int("make_optimizer.decay_steps", decay_steps, 1, "train.num_steps")
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
               "param_norm": optax.tree.norm(params),
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


def _diverged(what: str, step: int, manager) -> TrainingDivergedError:
  manager.wait_until_finished()
  latest = manager.latest_step()
  kept = (f"The last good checkpoint (step {latest}) in {manager.directory} is kept "
          f"untouched." if latest is not None else "No checkpoint had been saved yet.")
  return TrainingDivergedError(
      f"{what} at step {step}: training diverged. {kept} Lower the learning rate "
      f"(make_optimizer.learning_rate), lengthen warm-up (make_optimizer.warmup_steps) or "
      f"clip gradients (make_optimizer.grad_clip_norm), then rerun: it resumes from there.")


def _check_finite(step: int, host_metrics: dict, manager) -> None:
  loss = host_metrics["loss"]
  if not math.isfinite(loss) or not host_metrics["params_finite"]:
    what = (f"Loss is {loss}" if not math.isfinite(loss) else
            f"The parameters became NaN or infinite (loss {loss:.4g})")
    raise _diverged(what, step, manager)


class SpikeDetector:
  """Stops a finite explosion the way a NaN is stopped: a loss, or the parameters' norm, above
  `factor` times the median of its last `window` values (checked once `warmup` values exist).

  The loss of step s is computed from the parameters of step s-1, so an update that blew the
  parameters up shows in the loss only one step later, after step s-1 may have been saved; the
  parameter norm is checked too, against a history that starts with the norm of the starting
  parameters, so that such a step is never kept as the last good one. The history restarts on
  resume. factor None switches the check off. A loss at or below `min_loss` is never a spike:
  near zero (a fitted classifier's 0.007 nats) a tenfold rise is ordinary noise, not an
  explosion, which drives the loss up by whole nats.
  """

  def __init__(self, factor: Optional[float], window: int, warmup: int, min_loss: float = 1.0):
    self.factor, self.window, self.warmup = factor, window, warmup
    self.min_loss = min_loss
    self.history = {"loss": [], "param_norm": []}

  def start(self, param_norm: float) -> None:
    self.history["param_norm"] = [param_norm] * self.warmup

  def check(self, step: int, host_metrics: dict, manager) -> None:
    if self.factor is None:
      return
    for name, label in (("loss", "Loss"), ("param_norm", "Parameter norm")):
      value = host_metrics.get(name)
      if value is None:
        continue
      past = self.history[name]
      if len(past) >= self.warmup:
        median = statistics.median(past)
        if value > self.factor * median and (name != "loss" or value > self.min_loss):
          raise _diverged(
              f"{label} spiked to {value:.4g}, {value / median:.3g} times the median {median:.4g}"
              f" of the last {len(past)} step(s) (train.spike_factor={self.factor:g})", step,
              manager)
      past.append(value)
      del past[:-self.window]


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
          task: str = "lm", profile_steps: Optional[Tuple[int, int]] = None,
          spike_factor: Optional[float] = 10.0, spike_window: int = 50,
          spike_warmup: int = 1, spike_min_loss: float = 1.0) -> dict:
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
  `spike_factor`: a loss (or parameter norm) above this many times the median of the last
  `spike_window` steps stops the run before it saves, like a NaN (None: off; the check starts
  once `spike_warmup` steps are in the window); a loss at or below `spike_min_loss` is never a
  spike (a tenfold rise near zero is noise: AS-ViT's first pruned steps from a fitted ViT).
  The returned summary also names the run's `checkpoint_dir`.

  Order: every argument, the data, the model and any checkpoint to resume or start from are
  checked before the workdir is written (config.gin, metrics, checkpoints), so a rejected run
  leaves it as it was; one process at a time writes a workdir (checkpointing.WorkdirLock).
  """
  _check_arguments(num_steps=num_steps, batch_size=batch_size, seq_len=seq_len,
                   log_every=log_every, eval_every=eval_every, eval_batches=eval_batches,
                   profile_steps=profile_steps, spike_factor=spike_factor,
                   spike_window=spike_window, spike_warmup=spike_warmup,
                   spike_min_loss=spike_min_loss)
  existed = epath.Path(workdir).exists()
  workdir_path = checkpointing.ensure_writable(workdir)
  # Only process 0 takes the lock: the processes of one multi-process run share the workdir.
  lock = checkpointing.WorkdirLock(workdir_path) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    return _train(workdir_path, num_steps=num_steps, batch_size=batch_size, seq_len=seq_len,
                  seed=seed, log_every=log_every, eval_every=eval_every,
                  eval_batches=eval_batches, peak_flops_per_device=peak_flops_per_device,
                  model_config=model_config, init_checkpoint=init_checkpoint,
                  task_loss_weight=task_loss_weight, task=task, profile_steps=profile_steps,
                  spikes=SpikeDetector(spike_factor, spike_window, spike_warmup,
                                       spike_min_loss))
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    raise checkpointing.CheckpointWriteError(
        f"Could not write {e.filename or workdir_path}: {e.strerror}. Free space (or point "
        f"--workdir at a larger disk) and rerun: training resumes from the latest intact "
        f"checkpoint.") from e
  finally:
    if lock is not None:
      lock.release()
    if not existed and workdir_path.exists() and not any(workdir_path.iterdir()):
      workdir_path.rmdir()  # a rejected run leaves no empty workdir behind


def _check_arguments(*, num_steps, batch_size, seq_len, log_every, eval_every, eval_batches,
                     profile_steps, spike_factor, spike_window, spike_warmup,
                     spike_min_loss) -> None:
  """Every count, interval and rate of a run, before anything is written."""
  arguments.check_int("train.num_steps", num_steps, 1)
  arguments.check_int("train.batch_size", batch_size, 1)
  arguments.check_int("train.seq_len", seq_len, 1)
  arguments.check_int("train.log_every", log_every, 1, " (steps between progress lines)")
  arguments.check_int("train.eval_every", eval_every, 0, " (0 switches periodic evaluation off)")
  arguments.check_optional_int("train.eval_batches", eval_batches, 1, "the whole split")
  if spike_factor is not None:
    arguments.check_rate("train.spike_factor", spike_factor)
    if spike_factor <= 1:
      raise ValueError(f"train.spike_factor={spike_factor}: must be > 1 (a multiple of the "
                       f"recent median loss), or None to switch the spike check off.")
  arguments.check_int("train.spike_window", spike_window, 1)
  arguments.check_int("train.spike_warmup", spike_warmup, 1)
  arguments.check_rate("train.spike_min_loss", spike_min_loss, allow_zero=True,
                       why=" Losses at or below it never count as spikes; 0 checks every loss.")
  if profile_steps is not None:
    if (not isinstance(profile_steps, (tuple, list)) or len(profile_steps) != 2 or
        not all(isinstance(x, int) and not isinstance(x, bool) for x in profile_steps)):
      raise arguments.BindingTypeError(
          f"train.profile_steps={profile_steps!r}: expected a pair of ints (start, stop), e.g. "
          f"train.profile_steps = (10, 15).")
    start, stop = profile_steps
    if not 1 <= start < stop <= num_steps + 1:
      raise ValueError(f"train.profile_steps={tuple(profile_steps)}: need 1 <= start < stop <= "
                       f"num_steps + 1 = {num_steps + 1} (steps start..stop-1 are traced).")
  # make_manager and make_optimizer check their own arguments when they are called, still
  # before the workdir is written; the manager's are checked here too so a bad keep or
  # save_every fails before the data and the model are built.
  save_every, keep = (_bound_or(f"make_manager.{n}", d) for n, d in (("save_every", 500),
                                                                     ("keep", 3)))
  if not any(isinstance(v, gin.config.ConfigurableReference) for v in (save_every, keep)):
    checkpointing.check_manager_arguments(save_every, keep)  # macros are checked when called


def _bound_or(name: str, default):
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def _agreed(flag: bool) -> bool:
  """Process 0's answer on every process (a process that looked after process 0 created the
  checkpoint folder would otherwise restore alone and the collectives would not match)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _first_batch(train_iter, mesh):
  """The first training batch, read before the workdir is written (a corrupt or unreadable data
  file fails here, not after config.gin and the first checkpoint)."""
  return sharding.global_batch(next(train_iter), mesh)


def _train(workdir_path, *, num_steps, batch_size, seq_len, seed, log_every, eval_every,
           eval_batches, peak_flops_per_device, model_config, init_checkpoint,
           task_loss_weight, task, profile_steps, spikes) -> dict:
  kernels.configure_kernels()
  task_obj = tasks.make_task(task, seq_len=seq_len, model_config=model_config)
  task_obj.check()

  mesh = sharding.make_mesh()
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"train.batch_size={batch_size} does not split over the mesh's "
                     f"data x fsdp = {shards} batch shards; make it a multiple of {shards}.")
  rules = sharding.logical_axis_rules()
  train_data = task_obj.dataset("train", batch_size=batch_size, train=True, seed=seed)
  # Opened now so that a split too small or missing fails before anything is written.
  task_obj.dataset("validation", batch_size=batch_size, train=False,
                   eval_max_batches=eval_batches)
  model = task_obj.build_model(train_data)
  tx = make_optimizer(num_steps)
  config_str = gin.config_str()
  root = workdir_path / checkpointing.CHECKPOINT_SUBDIR

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, abstract, state_sharding = init_train_state(model, tx, seq_len, seed, mesh, rules,
                                                       task=task_obj)
    train_iter = iter(train_data)
    start_step, latest, skipped = 0, None, []
    if _agreed(root.exists()):
      with checkpointing._read_only_manager(root) as reader:  # pylint: disable=protected-access
        latest, params, opt_state, skipped = checkpointing.find_resumable(reader, abstract,
                                                                          train_iter)
    if latest is not None:
      state = state.replace(step=jnp.asarray(latest, jnp.int32), params=params,
                            opt_state=opt_state)
      start_step = latest
    elif init_checkpoint:
      params, new, unused = checkpointing.init_params_from(init_checkpoint, state.params)
      state = state.replace(params=params)
      metrics_lib.say(
          f"Initialised params from {init_checkpoint}" +
          (f"; {len(new)} new parameter(s) keep their init: {', '.join(new[:6])}"
           f"{' ...' if len(new) > 6 else ''}" if new else "") +
          (f"; {len(unused)} checkpoint parameter(s) unused: {', '.join(unused[:6])}"
           f"{' ...' if len(unused) > 6 else ''}" if unused else ""))
    first_batch = _first_batch(train_iter, mesh) if start_step < num_steps else None
    spikes.start(float(jax.jit(optax.tree.norm)(state.params)))

    # Every check passed: from here on the workdir is written.
    manager = checkpointing.make_manager(str(workdir_path))
    if jax.process_index() == 0:
      checkpointing.set_aside(manager, skipped)
      (workdir_path / "config.gin").write_text(config_str)
    if latest is not None:
      metrics_lib.say(f"Resuming from checkpoint step {latest} in {manager.directory}" +
                      (f" (skipped damaged step(s) {skipped})" if skipped else ""))
    else:
      metrics_lib.say(f"Model: {count_params(state.params):,} parameters; mesh "
                      f"{dict(mesh.shape)}; {jax.device_count()} device(s), "
                      f"{jax.process_count()} process(es)")

    grad_mask = trainable_mask(gin.query_parameter("make_optimizer.trainable")
                               if _bound("make_optimizer.trainable") else None, state.params)
    if not all(jax.tree.leaves(grad_mask)):
      frozen = count_params(state.params) - sum(
          int(np.prod(x.shape)) for x, m in zip(jax.tree.leaves(state.params),
                                                jax.tree.leaves(grad_mask)) if m)
      metrics_lib.say(f"Training {count_params(state.params) - frozen:,} parameters; "
                      f"{frozen:,} frozen (make_optimizer.trainable)")
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
      metrics_lib.say(f"  eval @ step {step}: {task_obj.eval_line(summary)}")
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
      batch = first_batch if step == start_step + 1 else sharding.global_batch(
          next(train_iter), mesh)
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
        metrics_lib.say(f"  profile of steps {profile_steps[0]}..{step} written to "
                        f"{profile_dir} (tensorboard --logdir {profile_dir})")
      pending.append(step_metrics)
      window_steps += 1
      last = step == num_steps
      if step % log_every == 0 or last or manager.should_save(step):
        host = jax.device_get(pending)
        pending = []
        for offset, m in enumerate(host):
          floats = {k: float(v) for k, v in m.items()}
          _check_finite(step - len(host) + 1 + offset, floats, manager)
          spikes.check(step - len(host) + 1 + offset, floats, manager)
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
    checkpointing.finish(manager, step, state)
    writer.close()
  logging.info("Training finished at step %d", step)
  return dict(summary, checkpoint_dir=str(manager.directory))
