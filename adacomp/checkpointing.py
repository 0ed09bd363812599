"""orbax checkpoints: params, optimizer state, input-iterator state and the gin config.

Layout: `<workdir>/checkpoints/<step>/{params,opt_state,data,meta}`. Each item is its own orbax
item so that evaluation and analysis restore `params` alone. orbax writes a step into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous steps intact
and a restart resumes from the latest complete one (the partial one is removed on start-up).

Integrity: orbax does not notice flipped bits in an array file (tests/adacomp/test_faults.py), so
`save` writes a sha256 of every params and opt_state leaf, computed from the host values it
hands to orbax, into the step's `meta` item, and every restore compares them. A damaged step is
refused by name; training resumes from the newest intact one (`find_resumable`). Nothing is
deleted to recover: a skipped step is moved to `<workdir>/damaged_checkpoints/`.
One writer per workdir: `WorkdirLock` (host, pid, start time in `<workdir>/train.lock`).
"""
import datetime
import hashlib
import json
import os
import shutil
import socket
from typing import Any, Optional

import gin
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from adacomp import arguments

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(ValueError):
  """A checkpoint that cannot serve the requested use (missing, or mismatched with the config)."""


class CheckpointDamagedError(CheckpointError):
  """A saved step whose files are unreadable or whose arrays fail their checksums."""

  def __init__(self, message: str, step: Optional[int] = None, path: Optional[str] = None):
    super().__init__(message)
    self.step, self.path = step, path


class CheckpointWriteError(CheckpointError):
  """A step that could not be written (full disk, I/O error); the partial folder is removed."""


class WorkdirLockedError(PermissionError):
  """Another live process is writing the same workdir."""


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


LOCK_FILE = "train.lock"
DAMAGED_SUBDIR = "damaged_checkpoints"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


class WorkdirLock:
  """`<workdir>/train.lock` while a run writes the workdir: {host, pid, start}.

  Created with O_EXCL, so of two runs started together exactly one gets it. A lock whose pid is
  gone on this host is stale (a killed run) and is taken over with a warning; a live holder, or
  one on another host (its pid cannot be checked from here), refuses the second run.
  """

  def __init__(self, workdir, log=print):
    self.path = epath.Path(workdir) / LOCK_FILE
    self._log = log
    self._held = False

  def _create(self) -> bool:
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
      fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(record, f)
    return True

  def acquire(self) -> "WorkdirLock":
    for _ in range(2):
      if self._create():
        self._held = True
        return self
      try:
        holder = json.loads(self.path.read_text())
        host, pid, start = holder["host"], int(holder["pid"]), holder.get("start", "?")
      except (OSError, ValueError, KeyError, TypeError):
        host, pid, start = None, None, "?"
      if host == socket.gethostname() and pid is not None and not _pid_alive(pid):
        self._log(f"WARNING: taking over the stale lock {self.path} of process {pid} on {host} "
                  f"(started {start}); that process is gone (killed or crashed).")
        self.path.unlink(missing_ok=True)
        continue
      who = (f"process {pid} on host {host} (started {start})" if host is not None else
             "an unreadable lock record")
      raise WorkdirLockedError(
          f"Workdir {self.path.parent} is being written by {who}: {self.path} is held. Two runs "
          f"in one workdir overwrite each other's checkpoints. Wait for that run to end, use "
          f"another --workdir, or, if that run is dead"
          f"{' (on another host, so it cannot be checked from here)' if host != socket.gethostname() else ''}, "
          f"remove {self.path}.")
    raise WorkdirLockedError(f"Could not take the lock {self.path}; another run keeps taking it.")

  def release(self) -> None:
    if self._held:
      self.path.unlink(missing_ok=True)
      self._held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


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


def check_manager_arguments(save_every, keep) -> None:
  """`make_manager`'s counts, checked before a manager (and its folder) exists."""
  arguments.check_int("make_manager.save_every", save_every, 1, " (steps between saves)")
  arguments.check_int("make_manager.keep", keep, 1,
                      " (keep=0 would delete every checkpoint, the final one included)")


@gin.configurable
def make_manager(workdir: str, *, save_every: int = 500, keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  check_manager_arguments(save_every, keep)
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINT_SUBDIR, options=options,
                               item_names=ITEMS, item_handlers=_item_handlers())


class _DataPositionError(ValueError):
  """The data-position file of a step does not parse; `restore` names the file."""


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
    try:
      decoded = json.loads(state.decode())
      self._iterator.set_state(decoded)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
      raise _DataPositionError(str(e)) from e

  def start_prefetch(self) -> None:
    pass


def _host_leaf(x) -> Optional[np.ndarray]:
  """The full value of a leaf on this host, or None when it is sharded across processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      return None
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def leaf_digests(tree) -> dict:
  """sha256 of every leaf's dtype, shape and bytes, keyed by its path (None where a leaf is
  sharded across processes and no host holds it whole)."""
  digests = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    value = _host_leaf(leaf)
    if value is None:
      digests[jax.tree_util.keystr(path)] = None
      continue
    h = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    h.update(np.ascontiguousarray(value).tobytes())
    digests[jax.tree_util.keystr(path)] = h.hexdigest()
  return digests


def _disk_error(e: BaseException) -> Optional[str]:
  """'no space left on device' (or the OS's words) when `e` or its causes is a write error."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno is not None:
      return os.strerror(seen.errno)
    text = str(seen)
    if "No space left on device" in text or "ENOSPC" in text:
      return "No space left on device"
    seen = seen.__cause__ or seen.__context__
  return None


def _tree_bytes(tree) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def _write_failed(manager, step: int, e: BaseException, needed: int) -> CheckpointWriteError:
  """Removes the half-written step folder(s) and says what failed and what is intact."""
  root = epath.Path(manager.directory)
  try:
    manager.close()
  except Exception:  # pylint: disable=broad-except
    pass  # it re-raises the failed write; the folders are cleaned up below
  removed = []
  # One writer per workdir (WorkdirLock), so every temporary step folder is this run's own.
  for path in sorted(root.iterdir()) if root.exists() else []:
    if ".orbax-checkpoint-tmp" in path.name:
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path.name)
  try:
    free = shutil.disk_usage(str(root)).free
  except OSError:
    free = None
  intact = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
  space = (f" Each step needs about {needed / 1e6:.1f} MB; {free / 1e6:.1f} MB are free under "
           f"{root}." if free is not None else "")
  return CheckpointWriteError(
      f"Could not write checkpoint step {step} to {root}: {_disk_error(e) or e}.{space} "
      f"{'The half-written folder(s) ' + ', '.join(removed) + ' removed. ' if removed else ''}"
      f"Saved steps {intact or 'none'} are intact. Free space (or point --workdir at a larger "
      f"disk) and rerun: training resumes from the latest intact step.")


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, meta: dict,
         force: bool = False) -> bool:
  """Saves step `step` if the manager's policy (or `force`) says so; returns whether it did.

  The meta item carries a sha256 per params/opt_state leaf, computed here from the same host
  values that orbax writes asynchronously.
  """
  if not (force or manager.should_save(step)):
    return False
  meta = dict(meta, digests={"params": leaf_digests(state.params),
                             "opt_state": leaf_digests(state.opt_state)})
  try:
    return manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        data=grain.checkpoint.CheckpointSave(_IteratorState(data_iter)),
        meta=ocp.args.JsonSave(meta)), force=force)
  except Exception as e:  # pylint: disable=broad-except
    if _disk_error(e) is None:
      raise
    raise _write_failed(manager, step, e, _tree_bytes(state)) from e


def finish(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Waits for the asynchronous save of `step` and closes the manager, naming a failed write."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    if _disk_error(e) is None:
      raise
    raise _write_failed(manager, step, e, _tree_bytes(state)) from e
  manager.close()


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


def _saved_steps(root: epath.Path) -> list:
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _damaged(step: int, path, what: str) -> CheckpointDamagedError:
  path = epath.Path(path)
  step_dir = next((p for p in [path, *path.parents] if p.name == str(step)), path)
  others = [s for s in _saved_steps(step_dir.parent) if s != step]
  return CheckpointDamagedError(
      f"Checkpoint step {step} is damaged: {path} {what}. Restore that folder from a copy, or "
      f"use another step (saved steps: {others or 'none'}); training resumes from the newest "
      f"intact step by itself.", step=step, path=str(path))


def _item_metadata(manager, step: int, item: str):
  root = epath.Path(manager.directory)
  if not (root / str(step)).exists():
    raise CheckpointError(f"No checkpoint step {step} under {root}; the saved steps are "
                          f"{_saved_steps(root) or 'none'}. Pass one of them as --step.")
  try:
    saved = manager.item_metadata(step)[item]
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(step, root / str(step) / item, f"cannot be read ({e})") from e
  if saved is None:
    raise _damaged(step, root / str(step) / item, "is missing or unreadable (it is not an "
                   "adacomp checkpoint, or is damaged)")
  return getattr(saved, "tree", saved)


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
  """Raises CheckpointError naming every parameter whose shape differs from the model's."""
  saved = _item_metadata(manager, step, "params")
  problems = _shape_mismatches(saved, abstract_params)
  if problems:
    shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
    raise CheckpointError(
        f"Checkpoint step {step} in {manager.directory} does not match the model built from the "
        f"gin config ({len(problems)} parameter(s) differ):\n  {shown}\nUse the gin config the "
        f"checkpoint was trained with (it is saved beside it as config.gin), or train into a new "
        f"--workdir.")


def _restore_meta(manager, step: int) -> dict:
  root = epath.Path(manager.directory)
  path = root / str(step) / "meta"
  if not (root / str(step)).exists():
    raise CheckpointError(f"No checkpoint step {step} under {root}; the saved steps are "
                          f"{_saved_steps(root) or 'none'}. Pass one of them as --step.")
  if not path.exists():
    raise _damaged(step, path, "is missing (the step's metadata: its gin config, data sizes "
                   "and checksums)")
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(step, path, f"cannot be read ({type(e).__name__}: {str(e)[:200]})") from e
  if not isinstance(meta, dict) or "gin_config" not in meta:
    raise _damaged(step, path, "holds no gin config (not an adacomp checkpoint's metadata)")
  return meta


def verify(step: int, item_dir, restored, digests: Optional[dict]) -> None:
  """Raises CheckpointDamagedError when a restored leaf's sha256 differs from the saved one.

  Steps saved before checksums existed (no digests) are accepted as they are.
  """
  if not digests:
    return
  actual = leaf_digests(restored)
  bad = [k for k, d in digests.items() if d is not None and actual.get(k) not in (None, d)]
  if bad:
    raise _damaged(step, item_dir, f"fails its checksum in {len(bad)} array(s) "
                   f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): its files changed "
                   f"after they were saved (disk or copy error)")


def _restore_arrays(manager, step: int, items: dict):
  """manager.restore of `items`, with unreadable files reported as a damaged step."""
  root = epath.Path(manager.directory)
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except _DataPositionError as e:
    raise _damaged(step, root / str(step) / "data" /
                   f"process_{jax.process_index()}-of-{jax.process_count()}.json",
                   f"does not parse as a data position ({e})") from e
  except ValueError as e:
    if "tree structures do not match" in str(e):
      raise
    raise _damaged(step, root / str(step), f"cannot be restored ({str(e)[:300]})") from e
  except Exception as e:  # pylint: disable=broad-except
    # orbax and tensorstore raise plain Exception for a truncated or unreadable array file.
    cause = e.__cause__ or e.__context__
    if isinstance(cause, _DataPositionError):
      raise _damaged(step, root / str(step) / "data" /
                     f"process_{jax.process_index()}-of-{jax.process_count()}.json",
                     f"does not parse as a data position ({cause})") from e
    item = next((name for name in items if name in str(e)), None)
    reason = str(e).splitlines()[0].split(" See full TensorStore details")[0]
    raise _damaged(step, root / str(step) / (item or ""), f"cannot be read ({reason[:200]})") from e


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter):
  """Restores params, optimizer state and the iterator's position (in place) at `step`,
  verifying every array against the checksums saved with it."""
  check_compatible(manager, step, abstract_state.params)
  meta = _restore_meta(manager, step)
  try:
    restored = _restore_arrays(manager, step, dict(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
        data=grain.checkpoint.CheckpointRestore(_IteratorState(data_iter))))
  except ValueError as e:
    if isinstance(e, CheckpointError) or "tree structures do not match" not in str(e):
      raise
    raise CheckpointError(
        f"The optimizer state of checkpoint step {step} in {manager.directory} does not match "
        f"the optimizer built from the gin config (make_optimizer changed, e.g. grad_clip_norm "
        f"switched on or off). Resume with the run's own optimizer settings (config.gin beside "
        f"the checkpoints), or start a new --workdir from these params with "
        f"train.init_checkpoint.") from e
  step_dir = epath.Path(manager.directory) / str(step)
  digests = meta.get("digests") or {}
  verify(step, step_dir / "params", restored["params"], digests.get("params"))
  verify(step, step_dir / "opt_state", restored["opt_state"], digests.get("opt_state"))
  return restored["params"], restored["opt_state"], meta


def find_resumable(manager: ocp.CheckpointManager, abstract_state, data_iter, log=print):
  """Restores the newest intact step: (step, params, opt_state, skipped steps), or step None
  when there is no step at all. A config that does not match the checkpoint raises at once (it
  is the config's fault, not the step's); a damaged step is reported and the next older one
  tried. Raises CheckpointDamagedError when every step is damaged."""
  skipped = []
  for step in sorted(_saved_steps(epath.Path(manager.directory)), reverse=True):
    if step not in manager.all_steps():
      continue  # a folder orbax does not count as complete
    try:
      params, opt_state, _ = restore(manager, step, abstract_state, data_iter)
    except CheckpointDamagedError as e:
      log(f"WARNING: skipping damaged checkpoint step {step}: {e}")
      skipped.append(step)
      continue
    return step, params, opt_state, skipped
  if skipped:
    raise CheckpointDamagedError(
        f"Every checkpoint step under {manager.directory} is damaged ({skipped}; the warnings "
        f"above name the files), so there is nothing to resume from. Restore the folder from a "
        f"copy, or train into a new --workdir; nothing was changed or deleted.",
        step=skipped[0], path=str(manager.directory))
  return None, None, None, skipped


def set_aside(manager: ocp.CheckpointManager, steps, log=print) -> None:
  """Moves damaged steps to `<workdir>/damaged_checkpoints/` (kept, never deleted), so that the
  resumed run can save those step numbers again."""
  root = epath.Path(manager.directory)
  target = root.parent / DAMAGED_SUBDIR
  for step in steps:
    target.mkdir(parents=True, exist_ok=True)
    dest = target / str(step)
    suffix = 1
    while dest.exists():
      dest, suffix = target / f"{step}.{suffix}", suffix + 1
    (root / str(step)).rename(dest)
    log(f"Moved damaged checkpoint step {step} to {dest} (kept for inspection, not deleted).")
  if steps:
    manager.reload()


def read_meta(checkpoint_dir: str, step: Optional[int] = None) -> tuple[int, dict]:
  """(step, meta) of the latest (or given) complete checkpoint under checkpoint_dir."""
  root = checkpoint_root(checkpoint_dir)
  with _read_only_manager(root) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(
          f"No complete checkpoint under {root}. Pass the --workdir of a training run (or its "
          f"checkpoints/ folder) that saved at least one step.")
    meta = _restore_meta(manager, step)
  return step, meta


def restore_params(checkpoint_dir: str, abstract_params, step: Optional[int] = None) -> Any:
  """Restores only the params item (evaluation, analysis), checking shapes and checksums."""
  root = checkpoint_root(checkpoint_dir)
  with _read_only_manager(root) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No complete checkpoint under {root}.")
    check_compatible(manager, step, abstract_params)
    meta = _restore_meta(manager, step)
    params = _restore_arrays(manager, step, dict(
        params=ocp.args.StandardRestore(abstract_params)))["params"]
  verify(step, root / str(step) / "params", params, (meta.get("digests") or {}).get("params"))
  return params


def init_params_from(checkpoint_dir: str, fresh_params, step: Optional[int] = None):
  """Fresh params overwritten by every same-named parameter of another run's checkpoint.

  Starts a method from a checkpoint of a smaller parameter tree (a Duo model from a dense one:
  the big FFN's `wi`/`wo` come from the checkpoint, the small FFN and router keep their fresh
  init). Returns (params, new paths kept at init, checkpoint paths the model has no use for).
  A parameter present in both with different shapes raises CheckpointError; a damaged
  checkpoint raises CheckpointDamagedError.
  """
  root = checkpoint_root(checkpoint_dir)
  with _read_only_manager(root) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No complete checkpoint under {root}: nothing to initialise from "
                            f"(train.init_checkpoint).")
    saved = _item_metadata(manager, step, "params")
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
    meta = _restore_meta(manager, step)
    restored = _restore_arrays(manager, step, dict(
        params=ocp.args.StandardRestore()))["params"]
  verify(step, root / str(step) / "params", restored, (meta.get("digests") or {}).get("params"))
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


__all__ = ["CheckpointError", "CheckpointDamagedError", "CheckpointWriteError",
           "WorkdirLockedError", "WorkdirLock", "checkpoint_root", "ensure_writable",
           "make_manager", "save", "finish", "restore", "find_resumable", "set_aside",
           "restore_params", "init_params_from", "read_meta", "check_compatible", "verify",
           "leaf_digests", "tree_digest"]


def file_digests(path) -> dict:
  """{relative path: sha256} of every file under `path` ({} when it does not exist): a run's
  bytes, to check that a failing run left them untouched (tests/adacomp/test_faults.py,
  scripts/fault_table.py)."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out
