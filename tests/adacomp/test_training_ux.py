"""What a researcher sees around a run: progress line, profile, stage inputs, report names."""
import contextlib
import glob
import io
import json
import os

import gin
import pytest

from adacomp import checkpointing, cli, evaluation, gin_utils, training
from tests.corpus import configure, corpus_bindings

QUIET = ("train.num_steps = 4", "train.eval_every = 0", "train.log_every = 2",
         "make_manager.save_every = 4", "make_optimizer.decay_steps = 4")


def _train(corpus, workdir, *bindings):
  gin.clear_config()
  configure(corpus, *QUIET, *bindings)
  return training.train(str(workdir))


@pytest.fixture(scope="module", name="run")
def _run(corpus, tmp_path_factory):
  """(workdir, summary, printed log) of one 4-step run; the tests only add eval reports."""
  workdir = tmp_path_factory.mktemp("ux") / "run"
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    summary = _train(corpus, workdir)
  gin.clear_config()
  return workdir, summary, log.getvalue()


def test_progress_line_reports_achieved_tflops_and_the_summary_names_the_checkpoints(run):
  workdir, summary, log = run
  lines = [l for l in log.splitlines() if l.startswith("[")]
  assert len(lines) == 2 and all(" TFLOP/s" in l for l in lines), lines
  # TFLOP/s is one compiled step's FLOPs over the measured step time, so TFLOP/s x ms/step is
  # the same FLOP count in every window however the time varies.
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  flops = [r["tflops_per_s"] * r["step_ms"] for r in records if r["split"] == "train"]
  assert len(flops) == 2 and flops[0] > 0
  assert flops[1] == pytest.approx(flops[0], rel=1e-9)
  assert summary["checkpoint_dir"] == str(checkpointing.checkpoint_root(str(workdir)))
  assert os.path.isdir(os.path.join(summary["checkpoint_dir"], "4"))


def test_profile_steps_write_a_trace_into_the_workdir(corpus, tmp_path, capsys):
  _train(corpus, tmp_path / "run", "train.profile_steps = (2, 4)")
  traces = glob.glob(str(tmp_path / "run" / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces, os.listdir(tmp_path / "run")
  assert "profile of steps 2..3" in capsys.readouterr().out


def test_a_stage_config_without_its_input_names_the_earlier_stage_and_writes_nothing(
    corpus, tmp_path):
  gin.clear_config()
  gin_utils.parse(["configs/duo_router.gin"], corpus_bindings(corpus), finalize=False)
  with pytest.raises(ValueError, match=r"--workdir of a configs/duo\.gin run.*"
                                       r"train\.init_checkpoint="):
    training.train(str(tmp_path / "router"))
  assert not os.path.exists(tmp_path / "router")


def test_eval_reports_are_named_after_what_was_evaluated(run):
  workdir = run[0]
  names = []
  for batches in (2, None):
    step, meta = gin_utils.parse_checkpoint_config(str(workdir))
    report = evaluation.evaluate_checkpoint(str(workdir), meta, step, eval_batches=batches)
    names.append(os.path.basename(report["output"]))
  assert names == ["eval_validation_step4_2batches.json", "eval_validation_step4_all.json"]
  # Neither overwrote the other.
  assert all(os.path.isfile(workdir / n) for n in names)


@pytest.mark.parametrize("value,expected", [("all", None), ("ALL", None), ("3", 3)])
def test_whole_split_has_one_spelling(value, expected):
  assert cli.whole_split(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "none", ""])
def test_other_eval_batches_values_are_refused_with_the_spelling(value):
  with pytest.raises(ValueError, match="'all' for the whole split"):
    cli.whole_split(value)
