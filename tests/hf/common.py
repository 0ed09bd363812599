"""Shared helpers of the Hugging Face tests: the fixtures' paths and an import + load."""
import importlib.util
import os

import numpy as np

from adacomp import gin_utils
from adacomp.hf import importer
from adacomp.models import build

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "testdata", "hf")
LM_FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt")
HAVE_TRANSFORMERS = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def fixture(family: str) -> str:
  return os.path.join(FIXTURES, family)


def reference(family: str) -> dict:
  return dict(np.load(os.path.join(fixture(family), "reference.npz")))


def import_and_load(family: str, workdir: str, hf_dir=None):
  """Imports a fixture (the Llama one with its tokenizer) and loads it as eval.py does."""
  tokenizer = None if family == "llama" else importer.NO_TOKENIZER
  importer.import_lm(hf_dir or fixture(family), workdir, tokenizer=tokenizer, log=lambda m: None)
  step, meta = gin_utils.parse_checkpoint_config(workdir)
  model, params = build.load_decoder(workdir, meta, step)
  return model, params, meta


def import_fixtures(root, families=("llama", "gpt2")) -> dict:
  """Imports each fixture into root/<family> (GPT-2 without a tokenizer: it has none), once for
  a test module; returns {family: workdir}."""
  out = {}
  for family in families:
    tokenizer = importer.NO_TOKENIZER if family == "gpt2" else None
    out[family] = os.path.join(str(root), family)
    importer.import_lm(fixture(family), out[family], tokenizer=tokenizer, log=lambda m: None)
  return out


def assert_logits_close(ours, theirs, rtol=1e-5):
  """Same logits to `rtol` relative to the logits' scale (float32)."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  scale = np.abs(theirs).max()
  np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale)


def live_logits(hf_dir: str, ids: np.ndarray) -> np.ndarray:
  """transformers' own float32 forward on `ids` (only when torch is installed)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()
