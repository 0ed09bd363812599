"""The KV-cache decoder runs imported models as their forward pass does: learned positions
(GPT-2, OPT's offset), grouped-query heads in the cache and Mistral's window."""
import pytest

from adacomp import decoding
from adacomp.methods.skipdecode import schedule as skip_schedule
from tests.hf.common import assert_logits_close, import_and_load, reference


@pytest.mark.parametrize("family", ["gpt2", "opt", "mistral"])
def test_decoding_token_by_token_equals_the_reference_logits(family, tmp_path):
  model, params, _ = import_and_load(family, str(tmp_path / "w"))
  ids = reference(family)["ids"]
  decoder = decoding.Decoder(model.config)
  cache = decoder.init_cache(*ids.shape)
  kv = model.config.num_kv_heads or model.config.num_heads
  assert cache["attn"]["cached_key"].shape[-2] == kv  # the cache holds the kv heads only
  sched = skip_schedule.full_schedule(ids.shape[1], model.config.num_layers)
  logits = decoding.teacher_forced_logits(decoder, params, ids, sched, prompt_len=3)
  assert_logits_close(logits, reference(family)["logits"])
