"""orbax checkpoints: params, optimizer state, input-iterator state and the gin config.

Layout: `<workdir>/checkpoints/<step>/{params,opt_state,data,meta}`. Each item is its own orbax
item so that evaluation and analysis restore `params` alone. orbax writes a step into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous steps intact
and a restart resumes from the latest complete one (the partial one is removed on start-up).
"""
import json
import os
import socket
from typing import Any, Optional

import gin
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(ValueError):
  """A checkpoint that cannot serve the requested use (missing, or mismatched with the config)."""


def checkpoint_root(path: str) -> epath.Path:
  """Accepts a workdir or its `checkpoints/` folder."""
  path = epath.Path(path)
  if (path / CHECKPOINT_SUBDIR).exists():
    return path / CHECKPOINT_SUBDIR
  return path


def ensure_writable(workdir: str) -> epath.Path:
  """Creates the workdir and proves it writable before any work is done."""
  path = epath.Path(workdir)
  # One probe per process: the processes of a multi-process run share the workdir.
  probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise PermissionError(
        f"workdir {workdir!r} is not writable ({e.strerror or e}). Pass a --workdir you can "
        f"write to, e.g. --workdir=/tmp/adacomp_run.") from e
  return path


ITEMS = ("params", "opt_state", "data", "meta")


def _item_handlers() -> dict:
  """A handler for every item, so that fresh managers (restarts, eval.py) can read metadata and
  restore without having saved first."""
  return {"params": ocp.StandardCheckpointHandler(),
          "opt_state": ocp.StandardCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(),
          "data": grain.checkpoint.CheckpointHandler()}


def _read_only_manager(root: epath.Path) -> ocp.CheckpointManager:
  """Knows every item's handler (orbax warns about items on disk it cannot read otherwise);
  callers restore only what they need."""
  return ocp.CheckpointManager(root, item_names=ITEMS, item_handlers=_item_handlers(),
                               options=ocp.CheckpointManagerOptions(create=False))


@gin.configurable
def make_manager(workdir: str, *, save_every: int = 500, keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINT_SUBDIR, options=options,
                               item_names=ITEMS, item_handlers=_item_handlers())


class _IteratorState:
  """Presents any iterator with dict `get_state`/`set_state` to grain's orbax handler.

  The handler writes one `process_<i>-of-<n>.json` per process, so each process resumes its own
  shard of the input stream.
  """

  def __init__(self, iterator):
    self._iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self._iterator.get_state(), indent=1).encode()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    pass


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, meta: dict,
         force: bool = False) -> bool:
  """Saves step `step` if the manager's policy (or `force`) says so; returns whether it did."""
  return manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      data=grain.checkpoint.CheckpointSave(_IteratorState(data_iter)),
      meta=ocp.args.JsonSave(meta)), force=force)


def _shape_mismatches(saved_meta, abstract_tree) -> list[str]:
  saved = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in
           jax.tree_util.tree_flatten_with_path(saved_meta)[0]}
  expected = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in
              jax.tree_util.tree_flatten_with_path(abstract_tree)[0]}
  problems = []
  for key in sorted(set(saved) | set(expected)):
    if key not in saved:
      problems.append(f"{key}: expected by the config, absent from the checkpoint")
    elif key not in expected:
      problems.append(f"{key}: in the checkpoint, absent from the config's model")
    elif saved[key] != expected[key]:
      problems.append(f"{key}: checkpoint {saved[key]} vs config {expected[key]}")
  return problems


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
  """Raises CheckpointError naming every parameter whose shape differs from the model's."""
  saved = manager.item_metadata(step)["params"]
  if saved is None:
    raise CheckpointError(f"Checkpoint step {step} in {manager.directory} has no readable "
                          f"params; it is not an adacomp checkpoint or is damaged.")
  saved = getattr(saved, "tree", saved)
  problems = _shape_mismatches(saved, abstract_params)
  if problems:
    shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
    raise CheckpointError(
        f"Checkpoint step {step} in {manager.directory} does not match the model built from the "
        f"gin config ({len(problems)} parameter(s) differ):\n  {shown}\nUse the gin config the "
        f"checkpoint was trained with (it is saved beside it as config.gin), or train into a new "
        f"--workdir.")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter):
  """Restores params, optimizer state and the iterator's position (in place) at `step`."""
  check_compatible(manager, step, abstract_state.params)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
        data=grain.checkpoint.CheckpointRestore(_IteratorState(data_iter)),
        meta=ocp.args.JsonRestore()))
  except ValueError as e:
    if "tree structures do not match" not in str(e):
      raise
    raise CheckpointError(
        f"The optimizer state of checkpoint step {step} in {manager.directory} does not match "
        f"the optimizer built from the gin config (make_optimizer changed, e.g. grad_clip_norm "
        f"switched on or off). Resume with the run's own optimizer settings (config.gin beside "
        f"the checkpoints), or start a new --workdir from these params with "
        f"train.init_checkpoint.") from e
  return restored["params"], restored["opt_state"], restored["meta"]


def read_meta(checkpoint_dir: str, step: Optional[int] = None) -> tuple[int, dict]:
  """(step, meta) of the latest (or given) complete checkpoint under checkpoint_dir."""
  root = checkpoint_root(checkpoint_dir)
  with _read_only_manager(root) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(
          f"No complete checkpoint under {root}. Pass the --workdir of a training run (or its "
          f"checkpoints/ folder) that saved at least one step.")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  return step, meta


def restore_params(checkpoint_dir: str, abstract_params, step: Optional[int] = None) -> Any:
  """Restores only the params item (evaluation, analysis), checking shapes first."""
  root = checkpoint_root(checkpoint_dir)
  with _read_only_manager(root) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No complete checkpoint under {root}.")
    check_compatible(manager, step, abstract_params)
    return manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))["params"]


def init_params_from(checkpoint_dir: str, fresh_params, step: Optional[int] = None):
  """Fresh params overwritten by every same-named parameter of another run's checkpoint.

  Starts a method from a checkpoint of a smaller parameter tree (a Duo model from a dense one:
  the big FFN's `wi`/`wo` come from the checkpoint, the small FFN and router keep their fresh
  init). Returns (params, new paths kept at init, checkpoint paths the model has no use for).
  A parameter present in both with different shapes raises CheckpointError.
  """
  root = checkpoint_root(checkpoint_dir)
  with _read_only_manager(root) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No complete checkpoint under {root}: nothing to initialise from "
                            f"(train.init_checkpoint).")
    saved = manager.item_metadata(step)["params"]
    if saved is None:
      raise CheckpointError(f"Checkpoint step {step} in {root} has no readable params.")
    saved = getattr(saved, "tree", saved)
    saved_shapes = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in
                    jax.tree_util.tree_flatten_with_path(saved)[0]}
    fresh_flat, treedef = jax.tree_util.tree_flatten_with_path(fresh_params)
    wanted = {jax.tree_util.keystr(p): a for p, a in fresh_flat}
    clashes = [f"{k}: checkpoint {saved_shapes[k]} vs config {tuple(wanted[k].shape)}"
               for k in wanted if k in saved_shapes and saved_shapes[k] != tuple(wanted[k].shape)]
    if clashes:
      raise CheckpointError(
          f"train.init_checkpoint={checkpoint_dir} has parameters of other shapes than the model "
          f"built from the gin config:\n  " + "\n  ".join(clashes[:10]) +
          "\nUse the sizes the checkpoint was trained with (its config.gin).")
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore()))["params"]
  loaded = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(restored)[0]}
  leaves, new = [], []
  for path, fresh in fresh_flat:
    key = jax.tree_util.keystr(path)
    if key in loaded:
      value = np.asarray(loaded[key]).astype(fresh.dtype)
      leaves.append(jax.device_put(value, getattr(fresh, "sharding", None)))
    else:
      new.append(key)
      leaves.append(fresh)
  unused = sorted(set(loaded) - set(wanted))
  return jax.tree_util.tree_unflatten(treedef, leaves), new, unused


def tree_digest(tree) -> str:
  """A short fingerprint of a pytree's values, for logs and resume checks."""
  leaves = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]
  acc = np.float64(0.0)
  for i, leaf in enumerate(leaves):
    acc += np.sum(leaf.astype(np.float64)) * (i + 1)
  return f"{acc:.10e}"


__all__ = ["CheckpointError", "checkpoint_root", "ensure_writable", "make_manager", "save",
           "restore", "restore_params", "init_params_from", "read_meta", "check_compatible", "tree_digest"]
