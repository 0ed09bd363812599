"""Import -> export gives a Hugging Face directory with the original weights and logits."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from adacomp.hf import exporter, importer
from tests.hf.common import (HAVE_TRANSFORMERS, REPO, assert_logits_close, fixture,
                             import_and_load, live_logits, reference)


def _original_tensors(family):
  tensors = {}
  for name in os.listdir(fixture(family)):
    if name.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(fixture(family), name)))
  return tensors


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "opt"])
def test_round_trip_gives_the_original_tensors_and_logits(family, tmp_path):
  workdir, out = str(tmp_path / "w"), str(tmp_path / "hf")
  tokenizer = None if family == "llama" else importer.NO_TOKENIZER
  importer.import_lm(fixture(family), workdir, tokenizer=tokenizer, log=lambda m: None)
  exporter.export_lm(workdir, out, log=lambda m: None)
  exported, original = load_file(os.path.join(out, "model.safetensors")), _original_tensors(family)
  assert set(exported) == set(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["architectures"] == json.load(
      open(os.path.join(fixture(family), "config.json")))["architectures"]
  # Re-imported, the exported directory computes the reference logits again.
  model, params, _ = import_and_load(family, str(tmp_path / "again"), hf_dir=out)
  ref = reference(family)
  assert_logits_close(model.apply({"params": params}, ref["ids"]), ref["logits"])
  if HAVE_TRANSFORMERS:  # transformers itself loads the export
    assert_logits_close(live_logits(out, ref["ids"]), ref["logits"])


def test_export_as_another_family_is_refused(tmp_path):
  workdir = str(tmp_path / "w")
  importer.import_lm(fixture("gpt2"), workdir, tokenizer=importer.NO_TOKENIZER, log=lambda m: None)
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "export_hf.py"), f"--checkpoint_dir={workdir}",
       f"--out_dir={tmp_path / 'hf'}", "--family=llama"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  errors = [l for l in run.stderr.splitlines() if l.startswith("ERROR")]
  assert run.returncode == 1 and len(errors) == 1, run.stderr[-1500:]
  assert "has no llama equivalent" in errors[0]
