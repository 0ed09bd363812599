"""Bad Hugging Face inputs: each one error naming the cause and the fix."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adacomp.hf import convert, families, importer
from tests.hf.common import REPO, fixture


def _copy(family, tmp_path, edit_config=None):
  path = tmp_path / family
  shutil.copytree(fixture(family), path)
  if edit_config:
    config = json.loads((path / "config.json").read_text())
    edit_config(config)
    (path / "config.json").write_text(json.dumps(config))
  return str(path)


def _import(hf_dir, workdir, tokenizer=importer.NO_TOKENIZER):
  importer.import_lm(hf_dir, str(workdir), tokenizer=tokenizer, log=lambda m: None)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
  hf_dir = _copy("gpt2", tmp_path, lambda c: c.update(architectures=["BloomForCausalLM"]))
  with pytest.raises(families.UnsupportedConfigError,
                     match=r"BloomForCausalLM.*imports .*GPT2LMHeadModel.*LlamaForCausalLM"):
    _import(hf_dir, tmp_path / "w")


def test_unsupported_config_option_is_named(tmp_path):
  hf_dir = _copy("llama", tmp_path, lambda c: c.update(
      rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}))
  with pytest.raises(families.UnsupportedConfigError, match=r"rope_parameters=.*llama3"):
    _import(hf_dir, tmp_path / "w")


def test_missing_tensor_is_named(tmp_path):
  hf_dir = _copy("opt", tmp_path)
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  del tensors["model.decoder.layers.1.fc2.bias"]
  save_file(tensors, os.path.join(hf_dir, "model.safetensors"))
  with pytest.raises(convert.WeightError, match=r"'model.decoder.layers.1.fc2.bias' is missing"):
    _import(hf_dir, tmp_path / "w")


def test_mis_shaped_tensor_is_named(tmp_path):
  hf_dir = _copy("qwen2", tmp_path)
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
  save_file(tensors, os.path.join(hf_dir, "model.safetensors"))
  with pytest.raises(convert.WeightError,
                     match=r"'model.layers.0.self_attn.k_proj.weight'.*\(32, 32\).*\(16, 32\)"):
    _import(hf_dir, tmp_path / "w")


def test_sharded_checkpoint_missing_a_shard_names_it(tmp_path):
  hf_dir = _copy("llama", tmp_path)
  os.remove(os.path.join(hf_dir, "model-00002-of-00003.safetensors"))
  with pytest.raises(convert.WeightError, match=r"model-00002-of-00003.safetensors.*missing"):
    _import(hf_dir, tmp_path / "w")


def test_missing_tokenizer_says_how_to_go_on(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"No tokenizer.json.*--tokenizer=none"):
    _import(fixture("gpt2"), tmp_path / "w", tokenizer=None)


def test_workdir_that_holds_a_run_is_refused(tmp_path):
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "config.gin").write_text("")
  with pytest.raises(ValueError, match=r"already holds a run \(config.gin\).*new --workdir"):
    _import(fixture("gpt2"), tmp_path / "w")


def test_cli_prints_one_error_line(tmp_path):
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "import_hf.py"),
       f"--hf_dir={fixture('gpt2')}", f"--workdir={tmp_path / 'w'}"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert run.returncode == 1
  errors = [l for l in run.stderr.splitlines() if l.startswith("ERROR")]
  assert len(errors) == 1 and "tokenizer" in errors[0], run.stderr[-1500:]
