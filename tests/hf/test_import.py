"""Imported Hugging Face language models compute transformers' logits (tests/testdata/hf)."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adacomp import gin_utils, sharding
from adacomp.data.tokenizers import HFTokenizer
from adacomp.models import build
from tests.hf.common import (HAVE_TRANSFORMERS, LM_FAMILIES, REPO, assert_logits_close, fixture,
                             import_and_load, live_logits, reference)


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_imported_model_matches_the_transformers_reference_logits(family, tmp_path):
  model, params, _ = import_and_load(family, str(tmp_path / "w"))
  ref = reference(family)
  logits = model.apply({"params": params}, ref["ids"])
  assert_logits_close(logits, ref["logits"])
  if HAVE_TRANSFORMERS:  # the live comparison, where torch is installed
    assert_logits_close(logits, live_logits(fixture(family), ref["ids"]))


def test_imported_config_describes_each_family():
  """The fixtures exercise the options each family needs (GQA, biases, window, positions)."""
  from adacomp.hf import families, importer  # pylint: disable=g-import-not-at-top
  fields = {f: families.FAMILIES[f].model_config(importer.read_config(fixture(f)))
            for f in LM_FAMILIES}
  assert fields["llama"]["num_kv_heads"] == 2 and fields["llama"]["num_heads"] == 4
  assert fields["llama"]["ffn_gated"] and fields["llama"]["rope_layout"] == "half"
  assert fields["qwen2"]["attention_bias"] and not fields["qwen2"]["attention_out_bias"]
  assert fields["mistral"]["attention_window"] == 8 < reference("mistral")["ids"].shape[1]
  assert fields["gpt2"]["positions"] == "learned" and fields["gpt2"]["activation"] == "gelu_tanh"
  assert fields["opt"]["position_offset"] == 2 and fields["opt"]["activation"] == "relu"


def test_hf_tokenizer_encodes_the_prompt_as_transformers_does():
  expected = json.load(open(os.path.join(fixture("llama"), "generate.json")))
  tok = HFTokenizer(fixture("llama"))
  assert tok.encode_prompt(expected["prompt"]).tolist() == expected["prompt_ids"]
  assert tok.bos_id == expected["prompt_ids"][0]  # the post-processor's <s>
  assert tok.encode(expected["prompt"]).tolist() == expected["prompt_ids"][1:]
  if HAVE_TRANSFORMERS:
    import transformers  # pylint: disable=g-import-not-at-top
    hf_tok = transformers.AutoTokenizer.from_pretrained(fixture("llama"))
    assert hf_tok(expected["prompt"])["input_ids"] == expected["prompt_ids"]


def test_hf_tokenizer_bytes_sum_to_the_utf8_length():
  """Bits per byte stays comparable: a text's ids stand for exactly its UTF-8 bytes."""
  tok = HFTokenizer(fixture("llama"))
  for text in ("the cat sat on the mat", "h\u00e9llo w\u00f6rld \u2603"):
    ids = tok.encode(text)
    assert tok.num_bytes(ids).sum() == len(text.encode("utf-8"))
    assert tok.num_bytes(np.asarray([tok.bos_id, tok.eos_id])).sum() == 0


def test_import_places_parameters_on_a_sharded_mesh(tmp_path):
  """8 simulated devices, parameters split over fsdp x tensor as they are read; the
  checkpoint then computes the reference logits on one device."""
  workdir = str(tmp_path / "w")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "import_hf.py"),
       f"--hf_dir={fixture('qwen2')}", f"--workdir={workdir}", "--tokenizer=none",
       "--gin_bindings=make_mesh.data = 2", "--gin_bindings=make_mesh.fsdp = 2",
       "--gin_bindings=make_mesh.tensor = 2"],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "{'data': 2, 'fsdp': 2, 'tensor': 2} mesh" in run.stdout
  step, meta = gin_utils.parse_checkpoint_config(workdir)
  model = build.build_decoder(meta["vocab_size"])
  mesh, rules = sharding.make_mesh(), sharding.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = build.restore_sharded(workdir, model, jnp.zeros((1, 8), jnp.int32), mesh, rules,
                                   step)
  ref = reference("qwen2")
  assert_logits_close(model.apply({"params": params}, ref["ids"]), ref["logits"])
