"""scripts/generate.py on an imported model reproduces transformers' greedy generate()."""
import json
import os
import subprocess
import sys

import numpy as np

from adacomp.hf import importer
from tests.hf.common import REPO, fixture


def test_generate_matches_transformers_greedy_ids_and_logprobs(tmp_path):
  expected = json.load(open(os.path.join(fixture("llama"), "generate.json")))
  workdir = str(tmp_path / "llama")
  importer.import_lm(fixture("llama"), workdir, log=lambda m: None)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text(expected["prompt"] + "\n")
  output = tmp_path / "out.jsonl"
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "generate.py"), f"--checkpoint_dir={workdir}",
       f"--prompts={prompts}", f"--max_new_tokens={len(expected['ids'])}", f"--output={output}"],
      capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  row = json.loads(output.read_text().splitlines()[0])
  assert row["ids"] == expected["ids"]
  np.testing.assert_allclose(row["logprobs"], expected["logprobs"], rtol=1e-5, atol=1e-5)
