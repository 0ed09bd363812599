"""One fault of every kind a careful but hostile user can cause: each ends in a named error (or a
named fallback) and leaves every file saved before it intact (scripts/fault_table.py runs the
same faults through the command line)."""
import errno
import json
import os
import shutil
import subprocess
import sys

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from adacomp import arguments, checkpointing, gin_utils, training
from adacomp.data import local_text
from tests.corpus import REPO, configure, write_corpus


def _train(corpus, workdir, *bindings):
  gin.clear_config()
  configure(corpus, *bindings)
  return training.train(str(workdir))


def _largest_array_file(step_dir, item="params"):
  files = [p for p in (epath.Path(step_dir) / item).glob("ocdbt.process_0/d/*")]
  return max(files, key=lambda p: os.path.getsize(p))


def flip_bits(step_dir, item="params"):
  path = _largest_array_file(step_dir, item)
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 16):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))
  return path


def truncate(step_dir, item="params"):
  path = _largest_array_file(step_dir, item)
  path.write_bytes(path.read_bytes()[:os.path.getsize(path) // 2])
  return path


@pytest.fixture
def saved_run(tiny_run):
  """A finished tiny run with steps 1 (orbax saves the first), 2, 4, 6 and 8 saved; tests
  damage copies of it."""
  return tiny_run[0]


@pytest.fixture
def run_copy(saved_run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(saved_run, copy)
  return copy


def _restore_with_orbax_alone(workdir, step):
  root = checkpointing.checkpoint_root(str(workdir))
  with ocp.CheckpointManager(root, item_names=("params",)) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  return jax.tree.map(np.asarray, restored["params"])


# -- 1. configs from checkpoints are data ----------------------------------------------------

EXPLOIT = """from __gin__ import dynamic_registration
import os
os.system.command = 'touch {marker}'
train.init_checkpoint = @os.system()
"""


def _plant_config(workdir, step, text):
  path = checkpointing.checkpoint_root(str(workdir)) / str(step) / "meta" / "metadata"
  meta = json.loads(path.read_text())
  meta["gin_config"] = text + meta["gin_config"]
  path.write_text(json.dumps(meta))


def test_saved_config_that_imports_os_is_refused_and_never_run(run_copy, tmp_path):
  marker = tmp_path / "pwned"
  _plant_config(run_copy, 8, EXPLOIT.format(marker=marker))
  before = checkpointing.file_digests(run_copy)
  with pytest.raises(gin_utils.GinConfigError,
                     match=r"step 8 .* refused at line 1: 'from __gin__ import dynamic_regis"
                           r"tration': an import .*would run code.*--gin_file"):
    gin_utils.parse_checkpoint_config(str(run_copy))
  with pytest.raises(gin_utils.GinConfigError, match=r"line 1: 'import os'"):
    gin_utils.check_saved_config(EXPLOIT.format(marker=marker).split("\n", 1)[1], "planted")
  with pytest.raises(gin_utils.GinConfigError, match=r"@os.system is not a configurable of this"):
    gin_utils.check_saved_config("train.init_checkpoint = @os.system()\n", "planted")
  assert not marker.exists()
  assert checkpointing.file_digests(run_copy) == before


@pytest.mark.parametrize("config", gin_utils.available_configs())
def test_every_config_in_configs_passes_as_saved_data(config):
  gin_utils.parse([config], finalize=False)
  saved = gin.config_str()
  gin.clear_config()
  gin_utils.parse([], finalize=False)
  gin_utils.parse_saved_config(saved, config)
  assert gin.config_str() == saved


# -- 2. integrity ----------------------------------------------------------------------------

def test_orbax_alone_does_not_notice_flipped_bits_in_a_params_file(run_copy):
  """The finding that makes the checksums necessary: orbax restores the damaged values."""
  good = _restore_with_orbax_alone(run_copy, 8)
  flip_bits(run_copy / "checkpoints" / "8")
  damaged = _restore_with_orbax_alone(run_copy, 8)
  assert any(not np.array_equal(a, b, equal_nan=True)
             for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(damaged)))


def test_flipped_bits_are_refused_and_resume_falls_back_to_the_newest_intact_step(
    corpus, run_copy, capsys):
  flip_bits(run_copy / "checkpoints" / "8")
  before = checkpointing.file_digests(run_copy / "checkpoints")
  step, meta = checkpointing.read_meta(str(run_copy))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          _restore_with_orbax_alone(run_copy, 6))
  with pytest.raises(checkpointing.CheckpointDamagedError,
                     match=r"step 8 is damaged: \S*checkpoints/8/params fails its checksum"):
    checkpointing.restore_params(str(run_copy), abstract, step)
  _train(corpus, run_copy, "train.num_steps = 10", "make_optimizer.decay_steps = 10")
  out = capsys.readouterr().out
  assert "skipping damaged checkpoint step 8" in out and "Resuming from checkpoint step 6" in out
  # Nothing deleted: the damaged step is kept, byte for byte, beside the checkpoints.
  moved = checkpointing.file_digests(run_copy / checkpointing.DAMAGED_SUBDIR / "8")
  assert moved == {k[2:]: v for k, v in before.items() if k.startswith("8/")}
  after = checkpointing.file_digests(run_copy / "checkpoints")
  assert all(after[k] == v for k, v in before.items() if k.split("/")[0] in {"1", "2", "4", "6"})
  assert checkpointing.read_meta(str(run_copy))[0] == 10


# -- 3. one writer per workdir ---------------------------------------------------------------

def test_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(
    corpus, run_copy, capsys):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (run_copy / checkpointing.LOCK_FILE).write_text(json.dumps(
        {"host": os.uname().nodename, "pid": holder.pid, "start": "2026-01-01T00:00:00+00:00"}))
    before = checkpointing.file_digests(run_copy)
    with pytest.raises(checkpointing.WorkdirLockedError,
                       match=rf"being written by process {holder.pid} on host .*started "
                             rf"2026-01-01.*another --workdir"):
      _train(corpus, run_copy, "train.num_steps = 10")
    assert checkpointing.file_digests(run_copy) == before
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone now: its lock is stale and the next writer takes it over.
  with checkpointing.WorkdirLock(run_copy) as lock:
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
  assert "taking over the stale lock" in capsys.readouterr().out
  assert not (run_copy / checkpointing.LOCK_FILE).exists()


# -- 4. arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("binding,message", [
    ("train.num_steps = 0", r"train.num_steps=0: must be >= 1"),
    ("train.batch_size = -4", r"train.batch_size=-4: must be >= 1"),
    ("train.seq_len = 0", r"train.seq_len=0: must be >= 1"),
    ("train.log_every = 0", r"train.log_every=0: must be >= 1"),
    ("train.eval_every = -1", r"train.eval_every=-1: must be >= 0 \(0 switches"),
    ("make_manager.save_every = 0", r"make_manager.save_every=0: must be >= 1"),
    ("make_manager.keep = 0", r"make_manager.keep=0: must be >= 1 \(keep=0 would delete"),
    ("train.eval_batches = 0", r"train.eval_batches=0: must be >= 1 \(or None for the whole"),
    ("make_optimizer.learning_rate = float('nan')", None),
    ("make_optimizer.learning_rate = -1.0", r"learning_rate=-1.0: must be a finite number > 0"),
    ("make_mesh.data = 3", r"make_mesh: data x fsdp x tensor = 3x1x1 does not match the 1 "),
    ("train.profile_steps = (5, 2)", r"profile_steps=\(5, 2\): need 1 <= start < stop"),
    ("train.num_steps = '10'", r"train.num_steps='10': expected an int, got str"),
])
def test_bad_argument_is_refused_before_anything_is_written(corpus, run_copy, binding, message):
  if message is None:  # gin has no nan literal: a string stands in for a non-number
    binding, message = ("make_optimizer.learning_rate = 'fast'",
                        r"learning_rate='fast': expected a float, got str")
  before = checkpointing.file_digests(run_copy)
  with pytest.raises(ValueError, match=message):
    _train(corpus, run_copy, "train.num_steps = 10", binding)
  assert checkpointing.file_digests(run_copy) == before


def test_learning_rate_that_is_not_finite_is_refused():
  with pytest.raises(ValueError, match=r"learning_rate=inf: must be a finite number > 0"):
    arguments.check_rate("make_optimizer.learning_rate", float("inf"))


# -- 5. order: a rejected run leaves the workdir as it was ----------------------------------

def test_rejected_resume_leaves_the_workdir_byte_for_byte_as_it_was(corpus, run_copy, tmp_path):
  before = checkpointing.file_digests(run_copy)
  with pytest.raises(checkpointing.CheckpointError, match=r"(?s)does not match the model.*config.gin"):
    _train(corpus, run_copy, "train.num_steps = 10", "DecoderConfig.d_ff = 96")
  assert checkpointing.file_digests(run_copy) == before
  fresh = tmp_path / "fresh"
  with pytest.raises(checkpointing.CheckpointError, match=r"(?s)other shapes.*wi"):
    _train(corpus, fresh, "DecoderConfig.d_ff = 96", f"train.init_checkpoint = '{run_copy}'")
  assert not fresh.exists()


# -- 6. divergence beyond NaN -----------------------------------------------------------------

def test_finite_explosion_stops_before_it_is_saved(corpus, tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(training.TrainingDivergedError, match=r"spiked to .* times the median"):
    _train(corpus, workdir, "make_optimizer.learning_rate = 1e3", "make_manager.save_every = 1",
           "make_optimizer.warmup_steps = 1", "train.eval_every = 0")
  root = checkpointing.checkpoint_root(str(workdir))
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
  norms = [np.sqrt(sum(np.sum(np.square(x)) for x in
                       jax.tree.leaves(_restore_with_orbax_alone(workdir, s)))) for s in steps]
  # Every kept step has parameters of the size training started with, not exploded ones.
  assert norms and max(norms) < 10 * norms[0], (steps, norms)


class _Manager:
  """The checkpoint manager's surface a divergence error reads."""
  directory = "/ckpt"

  def wait_until_finished(self):
    pass

  def latest_step(self):
    return 4


def test_spike_detector_compares_with_the_running_median():
  spikes = training.SpikeDetector(factor=10.0, window=3, warmup=2)
  for step, loss in enumerate([5.0, 4.0, 3.0, 25.0], start=1):
    spikes.check(step, {"loss": loss}, _Manager())
  with pytest.raises(training.TrainingDivergedError, match=r"Loss spiked to 300, 75 times the median 4 .* at step 5"):
    spikes.check(5, {"loss": 300.0}, _Manager())


def test_spike_detector_ignores_a_tenfold_rise_near_zero_loss():
  # AS-ViT from a fitted ViT: 0.007 nats, then 0.08 when pruning starts. Not an explosion.
  spikes = training.SpikeDetector(factor=10.0, window=5, warmup=1)
  for step, loss in enumerate([0.008, 0.007, 0.0074, 0.007, 0.009, 0.08, 0.5], start=1):
    spikes.check(step, {"loss": loss}, _Manager())
  with pytest.raises(training.TrainingDivergedError, match=r"Loss spiked to 2"):
    spikes.check(8, {"loss": 2.0}, _Manager())
  strict = training.SpikeDetector(factor=10.0, window=5, warmup=1, min_loss=0.0)
  for step, loss in enumerate([0.008, 0.007, 0.0074], start=1):
    strict.check(step, {"loss": loss}, _Manager())
  with pytest.raises(training.TrainingDivergedError, match=r"Loss spiked to 0.08"):
    strict.check(4, {"loss": 0.08}, _Manager())



def test_spike_min_loss_is_checked_before_the_run():
  from adacomp import arguments
  ok = dict(num_steps=10, batch_size=2, seq_len=16, log_every=1, eval_every=5, eval_batches=1,
            profile_steps=None, spike_factor=10.0, spike_window=5, spike_warmup=1)
  training._check_arguments(**ok, spike_min_loss=0)  # 0: every loss is checked
  with pytest.raises(ValueError, match=r"train.spike_min_loss=-1.0: must be a finite number >= 0"):
    training._check_arguments(**ok, spike_min_loss=-1.0)
  with pytest.raises(arguments.BindingTypeError, match=r"train.spike_min_loss='1': expected a float"):
    training._check_arguments(**ok, spike_min_loss="1")

# -- 7. data and disk ------------------------------------------------------------------------

def test_corrupt_data_file_names_the_file(corpus, tmp_path):
  # The corpus prepared in a data_dir of this test's own (the shared one exists only once some
  # earlier test on this worker has trained on it).
  data_dir = tmp_path / "tfds"
  local_text.local_text_builder(corpus["glob"], str(data_dir)).download_and_prepare()
  train_file = next(data_dir.glob("local_text/*/1.0.0/*train.array_record*"))
  data = bytearray(train_file.read_bytes())
  for i in range(0, len(data), 7):
    data[i] ^= 0x5A
  train_file.write_bytes(bytes(data))
  with pytest.raises(local_text.DataError, match=rf"Cannot read .*{train_file.name}.*delete"):
    _train(dict(corpus, data_dir=str(data_dir)), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_corpus_too_small_for_its_splits_is_refused(corpus, tmp_path):
  glob = write_corpus(str(tmp_path / "one"), num_files=1)
  with pytest.raises(local_text.DataError, match=r"matches 1 file\(s\), too few for its splits"):
    _train({"glob": glob, "data_dir": str(tmp_path / "tfds")}, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_truncated_or_unparsable_steps_are_skipped_and_named(corpus, run_copy, capsys):
  truncated = truncate(run_copy / "checkpoints" / "8")
  position = run_copy / "checkpoints" / "6" / "data" / "process_0-of-1.json"
  position.write_text('{"epoch": 0, "doc"')
  with pytest.raises(checkpointing.CheckpointDamagedError, match=r"step 8 is damaged: .*/8/params"):
    checkpointing.restore_params(str(run_copy), jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _restore_with_orbax_alone(run_copy, 4)))
  before = checkpointing.file_digests(run_copy / "checkpoints")
  _train(corpus, run_copy)
  out = capsys.readouterr().out
  assert "skipping damaged checkpoint step 8" in out and "/8/params" in out
  assert "skipping damaged checkpoint step 6" in out and "process_0-of-1.json does not parse" in out
  assert "Resuming from checkpoint step 4" in out
  after = checkpointing.file_digests(run_copy / "checkpoints")
  assert all(after[k] == v for k, v in before.items() if k.split("/")[0] in {"1", "2", "4"})
  for step in ("6", "8"):  # both kept, byte for byte, the truncated file included
    assert checkpointing.file_digests(run_copy / checkpointing.DAMAGED_SUBDIR / step) == {
        k[2:]: v for k, v in before.items() if k.startswith(step + "/")}
  assert f"8/params/ocdbt.process_0/d/{truncated.name}" in before


def test_full_disk_names_the_space_and_removes_the_half_written_step(corpus, run_copy,
                                                                     monkeypatch):
  """A monkeypatched write (the data-position file of step 10) raises OSError(ENOSPC)."""
  write_text = epath.gpath.PosixGPath.write_text

  def full_disk(self, *args, **kwargs):
    if ".orbax-checkpoint-tmp" in str(self) and "/10." in str(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(epath.gpath.PosixGPath, "write_text", full_disk)
  before = checkpointing.file_digests(run_copy / "checkpoints")
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=r"step 10 .*No space left on device\. Each step needs about .* MB.*"
                           r"removed.*Saved steps \[1, 2, 4, 6, 8\] are intact"):
    _train(corpus, run_copy, "train.num_steps = 10", "make_optimizer.decay_steps = 10")
  root = run_copy / "checkpoints"
  assert not [p for p in root.iterdir() if "tmp" in p.name or p.name == "10"]
  after = checkpointing.file_digests(root)
  assert all(after[k] == v for k, v in before.items())


def test_step_never_saved_lists_the_saved_ones_and_missing_metadata_is_named(run_copy):
  with pytest.raises(checkpointing.CheckpointError, match=r"No checkpoint step 5 .* \[1, 2, 4, 6, 8\]"):
    checkpointing.read_meta(str(run_copy), 5)
  shutil.rmtree(run_copy / "checkpoints" / "8" / "meta")
  with pytest.raises(checkpointing.CheckpointDamagedError,
                     match=r"step 8 is damaged: \S*/8/meta is missing \(the step's metadata"):
    checkpointing.read_meta(str(run_copy))


def test_eval_cli_refuses_a_damaged_checkpoint_in_one_error_line(run_copy):
  flip_bits(run_copy / "checkpoints" / "8")
  before = checkpointing.file_digests(run_copy)
  out = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"),
                        f"--checkpoint_dir={run_copy}"], capture_output=True, text=True,
                       cwd=REPO, timeout=300, check=False)
  assert out.returncode == 1
  assert "ERROR: Checkpoint step 8 is damaged" in out.stderr and "fails its checksum" in out.stderr
  assert "Traceback" not in out.stderr
  assert checkpointing.file_digests(run_copy) == before
