"""End-to-end behaviour of train(): resume, divergence, evaluation, multi-process."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adacomp import checkpointing, evaluation, training
from adacomp.data import local_text
from tests.corpus import REPO, TINY_GIN, configure, corpus_bindings


def _train(corpus, workdir, *bindings):
  gin.clear_config()
  configure(corpus, *bindings)
  return training.train(str(workdir))


def _params(workdir, step=None):
  root = checkpointing.checkpoint_root(str(workdir))
  with ocp.CheckpointManager(root, item_names=("params",)) as manager:
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, restored["params"])


def _data_state(workdir, step):
  path = checkpointing.checkpoint_root(str(workdir)) / str(step) / "data" / "process_0-of-1.json"
  return json.loads(path.read_text())


def _assert_trees_equal(a, b, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_training_lowers_the_loss(corpus, tmp_path):
  _train(corpus, tmp_path / "run", "train.num_steps = 30", "make_optimizer.decay_steps = 30",
         "train.eval_every = 0")
  records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  assert train_losses[-1] < train_losses[0] - 0.5, train_losses
  assert (tmp_path / "run" / "config.gin").exists()
  assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_resumed_run_ends_on_the_same_params_and_data_position(corpus, tiny_run, tmp_path):
  whole_dir = tiny_run[0]  # the same 8 steps in one go
  _train(corpus, tmp_path / "split", "train.num_steps = 4")
  assert _params(tmp_path / "split")[0] == 4
  _train(corpus, tmp_path / "split")
  step_a, whole = _params(whole_dir)
  step_b, split = _params(tmp_path / "split")
  assert step_a == step_b == 8
  _assert_trees_equal(whole, split, atol=1e-6)
  assert _data_state(whole_dir, 8) == _data_state(tmp_path / "split", 8)


def test_eval_reproduces_the_final_validation_loss_of_training(tiny_run, tmp_path):
  shutil.copytree(tiny_run[0], tmp_path / "run")  # the report is written into the run
  summary = tiny_run[1]
  step, meta = checkpointing.read_meta(str(tmp_path / "run"))
  gin.parse_config(meta["gin_config"])
  report = evaluation.evaluate_checkpoint(str(tmp_path / "run"), meta, step)
  assert report["step"] == 8
  np.testing.assert_allclose(report["loss"], summary["loss"], rtol=1e-6)
  np.testing.assert_allclose(report["bits_per_byte"], summary["bits_per_byte"], rtol=1e-6)
  assert json.loads(open(report["output"]).read())["loss"] == report["loss"]


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
  _train(corpus, tmp_path / "run", "train.num_steps = 4")
  _, before = _params(tmp_path / "run")
  with pytest.raises(training.TrainingDivergedError,
                     match=r"training diverged\. The last good checkpoint \(step (\d+)\)") as e:
    _train(corpus, tmp_path / "run", "make_optimizer.learning_rate = 1e30",
           "make_manager.save_every = 1")
  last_good = int(re.search(r"checkpoint \(step (\d+)\)", str(e.value)).group(1))
  step, after = _params(tmp_path / "run")
  assert step == last_good >= 4
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after))
  _assert_trees_equal(before, _params(tmp_path / "run", step=4)[1])


class _FakeManager:
  directory = "/ckpt"

  def wait_until_finished(self):
    pass

  def latest_step(self):
    return 3


def test_non_finite_params_stop_training_even_when_the_loss_was_finite():
  with pytest.raises(training.TrainingDivergedError, match=r"parameters became NaN.*step 4"):
    training._check_finite(4, {"loss": 2.0, "params_finite": 0.0}, _FakeManager())
  training._check_finite(4, {"loss": 2.0, "params_finite": 1.0}, _FakeManager())


@pytest.fixture(scope="module")
def dense_run(corpus, tmp_path_factory):
  """A 2-step tiny dense run: the starting point of the init_checkpoint tests; read only."""
  workdir = tmp_path_factory.mktemp("dense") / "run"
  _train(corpus, workdir, "train.num_steps = 2", "train.eval_every = 0")
  gin.clear_config()
  return workdir


def test_resuming_with_a_different_optimizer_names_the_cause(corpus, dense_run, tmp_path):
  shutil.copytree(dense_run, tmp_path / "run")
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"optimizer state of checkpoint step 2 .* does not match"):
    _train(corpus, tmp_path / "run", "train.num_steps = 4", "make_optimizer.grad_clip_norm = None")


def _cli(args, env=None, **kw):
  return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args],
                          cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kw)


def _cli_args(corpus, workdir, *bindings):
  args = [f"--gin_file={TINY_GIN}", f"--workdir={workdir}"]
  return args + [f"--gin_bindings={b}" for b in corpus_bindings(corpus) + list(bindings)]


def test_run_killed_mid_save_resumes_from_the_last_complete_checkpoint(corpus, tmp_path, capsys):
  bindings = ["train.num_steps = 12", "make_optimizer.decay_steps = 12",
              "make_manager.save_every = 1", "train.eval_every = 0"]
  _train(corpus, tmp_path / "whole", *bindings, "make_manager.save_every = 100")  # same steps
  workdir = tmp_path / "killed"
  proc = _cli(_cli_args(corpus, workdir, *bindings))
  killed_during_save = False
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    root = workdir / "checkpoints"
    if root.exists() and any(".orbax-checkpoint-tmp" in p.name for p in root.iterdir()):
      if any(p.name.isdigit() and int(p.name) >= 3 for p in root.iterdir()):
        proc.send_signal(signal.SIGKILL)
        killed_during_save = True
        break
    time.sleep(0.002)
  proc.wait()
  assert killed_during_save, "the run finished before a save could be interrupted"
  capsys.readouterr()
  _train(corpus, workdir, *bindings)  # the resume, in this process
  assert "Resuming from checkpoint step" in capsys.readouterr().out
  _, whole = _params(tmp_path / "whole")
  step, after = _params(workdir)
  assert step == 12
  _assert_trees_equal(whole, after, atol=1e-6)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_joined_by_jax_distributed_agree_on_the_loss(corpus, tmp_path):
  # The corpus prepared once, here, rather than by both processes at the same time.
  local_text.local_text_builder(corpus["glob"], corpus["data_dir"]).download_and_prepare()
  port = _free_port()
  procs = [
      _cli(_cli_args(corpus, tmp_path / "mp", "train.num_steps = 4", "train.eval_every = 0") +
           [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
           env={"JAX_PLATFORMS": "cpu"})
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  finals = [next(l for l in out.splitlines() if l.startswith("Final validation")) for out in outputs]
  assert finals[0] == finals[1], finals
  assert "2 process(es)" in outputs[0]


def test_trainable_expression_freezes_everything_else(corpus, tmp_path):
  """Duo's router stage: only router parameters move; the budget loss alone drives them."""
  common = ("DecoderConfig.ffn_cls = @duo_ffn()", "duo_ffn.mode = 'random'",
            "train.eval_every = 0", "make_manager.save_every = 100")
  _train(corpus, tmp_path / "base", "train.num_steps = 2", *common)
  _, before = _params(tmp_path / "base")
  _train(corpus, tmp_path / "router", "train.num_steps = 4", *common,
         f"train.init_checkpoint = '{tmp_path / 'base'}'", "duo_ffn.mode = 'router'",
         "make_optimizer.trainable = 'router'", "train.task_loss_weight = 0.0",
         "duo_ffn.budget = (0.0, 0.0, 1.0)")
  _, after = _params(tmp_path / "router")
  flat_before = {"/".join(str(getattr(k, "key", k)) for k in path): v
                 for path, v in jax.tree_util.tree_leaves_with_path(before)}
  flat_after = {"/".join(str(getattr(k, "key", k)) for k in path): v
                for path, v in jax.tree_util.tree_leaves_with_path(after)}
  assert flat_before.keys() == flat_after.keys()
  moved = {k for k in flat_before if not np.array_equal(flat_before[k], flat_after[k])}
  assert moved and all("router" in k for k in moved), moved
  assert any("router" in k for k in moved)


def test_trainable_expression_that_matches_nothing_is_refused():
  with pytest.raises(ValueError, match="matches no parameter"):
    tx = training.make_optimizer(10, trainable="no_such_param")
    tx.init({"wi": np.zeros(3)})


def test_duo_run_starts_from_a_dense_checkpoint(corpus, dense_run, tmp_path, capsys):
  """init_checkpoint from a smaller tree: shared params are copied, new ones keep their init."""
  _, dense = _params(dense_run)
  _train(corpus, tmp_path / "duo", "train.num_steps = 2", "train.eval_every = 0",
         "DecoderConfig.ffn_cls = @duo_ffn()", "duo_ffn.mode = 'big'",
         "make_optimizer.trainable = 'router'", f"train.init_checkpoint = '{dense_run}'")
  assert "new parameter(s) keep their init" in capsys.readouterr().out
  _, duo = _params(tmp_path / "duo")
  assert set(duo["blocks"]["ffn"]) == {"wi", "wo", "wi_small", "wo_small", "router"}
  # Only the router trains, so the big FFN and the attention are still the dense run's.
  np.testing.assert_array_equal(duo["blocks"]["ffn"]["wi"], dense["blocks"]["ffn"]["wi"])
  np.testing.assert_array_equal(duo["blocks"]["attn"]["query"], dense["blocks"]["attn"]["query"])


def test_init_checkpoint_with_other_sizes_names_the_parameters(corpus, dense_run, tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match=r"(?s)other shapes.*wi"):
    _train(corpus, tmp_path / "wide", "train.num_steps = 2", "DecoderConfig.d_ff = 96",
           f"train.init_checkpoint = '{dense_run}'")
