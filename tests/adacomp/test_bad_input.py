"""Every bad input stops with one message that names the cause and the fix."""
import os
import subprocess
import sys

import gin
import pytest

from adacomp import checkpointing, gin_utils, training
from tests.corpus import REPO, TINY_GIN, configure


def _train(corpus, workdir, *bindings):
  gin.clear_config()
  configure(corpus, *bindings)
  return training.train(str(workdir))


def test_unknown_gin_file_names_the_file_and_lists_the_configs():
  with pytest.raises(gin_utils.GinConfigError,
                     match=r"Gin file 'configs/nope.gin' not found.*configs/dense.gin"):
    gin_utils.parse(["configs/nope.gin"])


def test_binding_to_an_unknown_configurable_names_the_binding():
  with pytest.raises(gin_utils.GinConfigError,
                     match=r"--gin_bindings='trian.num_steps = 3'.*trian"):
    gin_utils.parse([TINY_GIN], ["trian.num_steps = 3"])


def test_binding_to_an_unknown_parameter_names_the_parameter():
  with pytest.raises(gin_utils.GinConfigError, match=r"num_stepz"):
    gin_utils.parse([TINY_GIN], ["train.num_stepz = 3"])


def test_cli_reports_a_bad_binding_in_one_line_and_exits_nonzero(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"), f"--gin_file={TINY_GIN}",
       "--gin_bindings=DecoderConfig.num_layerz = 2", f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert out.returncode == 1
  assert "ERROR: Error in --gin_bindings='DecoderConfig.num_layerz = 2'" in out.stderr
  assert "Traceback" not in out.stderr


def test_sequence_length_beyond_the_model_is_rejected(corpus, tmp_path):
  with pytest.raises(ValueError, match=r"train.seq_len=128 exceeds .*max_len=64.*lower"):
    _train(corpus, tmp_path / "run", "train.seq_len = 128")


def test_corpus_glob_matching_no_files_is_rejected(corpus, tmp_path):
  with pytest.raises(ValueError, match=r"(?i)no files"):
    _train(corpus, tmp_path / "run", f"lm_dataset.glob = '{tmp_path}/missing/*.txt'")


def test_empty_corpus_is_rejected(corpus, tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("")
  with pytest.raises(ValueError, match=r"(?i)empty"):
    _train(corpus, tmp_path / "run", f"lm_dataset.glob = '{tmp_path}/empty/*.txt'")


def test_missing_named_dataset_says_how_to_prepare_it(corpus, tmp_path):
  with pytest.raises(ValueError, match=r"lm1b.*tfds build"):
    _train(corpus, tmp_path / "run", "lm_dataset.name = 'lm1b'",
           f"lm_dataset.data_dir = '{tmp_path}/no_tfds'")


def test_checkpoint_that_does_not_match_the_config_names_the_parameters(corpus, tmp_path):
  _train(corpus, tmp_path / "run", "train.num_steps = 2")
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"does not match the model.*d_?ff|wi.*\(2, 32, 64\) vs config "
                           r"\(2, 32, 96\)"):
    _train(corpus, tmp_path / "run", "train.num_steps = 4", "DecoderConfig.d_ff = 96")


def test_unwritable_workdir_is_rejected_before_any_work(corpus, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(PermissionError, match=r"is not writable.*--workdir"):
    _train(corpus, blocker / "run")
