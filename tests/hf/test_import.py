"""Imported Hugging Face language models compute transformers' logits (tests/testdata/hf)."""
import json
import os

import numpy as np
import pytest

from adacomp.data.tokenizers import HFTokenizer
from tests.hf.common import (HAVE_TRANSFORMERS, LM_FAMILIES, assert_logits_close, fixture,
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
