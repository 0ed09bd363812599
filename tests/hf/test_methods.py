"""The methods start from imported tiny models: the imported weights land where each method
reads them, a few training steps give a finite loss, and a SkipDecode fine-tune exports back.

Duo: tests/hf/test_duo_e2e.py; informed routing and MoD (the routed FFN):
tests/hf/test_routing_e2e.py.
The routed attention (layers/routing.py RoutedAttention) has no grouped-query / biased / half-rope
form, so routing the attention of an imported model is refused by name (the last test).
"""
import json
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from adacomp import checkpointing, gin_utils, training
from adacomp.hf import exporter, importer
from adacomp.models import build, vit
from tests.corpus import TINY_GIN, corpus_bindings
from tests.hf.common import assert_logits_close, fixture, import_and_load, reference

FAST = ("train.num_steps = 3", "train.eval_every = 0", "train.eval_batches = 2",
        "make_manager.save_every = 3", "make_optimizer.decay_steps = 3")


def _parse(configs, *bindings):
  gin.clear_config()
  gin_utils.parse(configs, list(bindings), finalize=False)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_skipdecode_fine_tunes_an_imported_llama_and_exports_it(corpus, tmp_path):
  imported = str(tmp_path / "llama")
  importer.import_lm(fixture("llama"), imported, log=lambda m: None)
  configs = ["configs/skipdecode.gin", TINY_GIN, os.path.join(imported, "config.gin")]
  bindings = corpus_bindings(corpus) + list(FAST) + [
      f"train.init_checkpoint = '{imported}'", "PROMPT_LEN = 8", "SPEEDUP = 1.5"]
  _parse(configs, *bindings)
  model = build.build_decoder(0)
  fresh = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params, new, unused = checkpointing.init_params_from(imported, fresh)
  assert new == [] and unused == []  # SkipDecode reads exactly the dense model's parameters
  hf = load_file(os.path.join(fixture("llama"), "model-00001-of-00003.safetensors"))
  np.testing.assert_array_equal(params["embed"]["embedding"], hf["model.embed_tokens.weight"])
  _parse(configs, *bindings)
  training.train(str(tmp_path / "skip"))
  losses = _losses(tmp_path / "skip")
  assert losses and np.all(np.isfinite(losses))
  # The fine-tune is still a plain Llama: it exports, and re-imports to the same function.
  out = str(tmp_path / "hf")
  exporter.export_lm(str(tmp_path / "skip"), out, log=lambda m: None)
  _, trained_meta = gin_utils.parse_checkpoint_config(str(tmp_path / "skip"))
  trained_model, trained = build.load_decoder(str(tmp_path / "skip"), trained_meta,
                                              checkpointing.read_meta(str(tmp_path / "skip"))[0])
  ids = reference("llama")["ids"]
  want = trained_model.apply({"params": trained}, ids)
  again, again_params, _ = import_and_load("llama", str(tmp_path / "again"), hf_dir=out)
  assert_logits_close(again.apply({"params": again_params}, ids), want)


def test_as_vit_fine_tunes_an_imported_vit(tmp_path):
  imported = str(tmp_path / "vit")
  importer.import_model(fixture("vit"), imported, log=lambda m: None)
  bindings = [f"image_dataset.data_dir = '{tmp_path / 'tfds'}'", "train.num_steps = 3",
              "train.batch_size = 8", "train.eval_every = 0", "train.eval_batches = 1",
              "train.log_every = 1", "make_manager.save_every = 3",
              "ViTConfig.prune_after = (1,)", "ViTConfig.threshold_init = (0.005,)",
              f"train.init_checkpoint = '{imported}'"]
  configs = ["configs/as_vit.gin", os.path.join(imported, "config.gin")]
  _parse(configs, *bindings)
  model = vit.build_vit(1, 10)
  fresh = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"])
  params, new, unused = checkpointing.init_params_from(imported, fresh)
  assert unused == [] and all("pruner" in k for k in new) and new  # only the thresholds are new
  hf = load_file(os.path.join(fixture("vit"), "model.safetensors"))
  np.testing.assert_array_equal(params["cls_token"], hf["vit.embeddings.cls_token"])
  _parse(configs, *bindings)
  summary = training.train(str(tmp_path / "as_vit"))
  losses = _losses(tmp_path / "as_vit")
  assert losses and np.all(np.isfinite(losses))
  assert summary["compute_fraction"] <= 1.0


def test_routed_attention_refuses_the_grouped_query_attention_by_name(tmp_path):
  imported = str(tmp_path / "llama")
  importer.import_lm(fixture("llama"), imported, log=lambda m: None)
  _parse(["configs/informed_routing.gin", TINY_GIN, os.path.join(imported, "config.gin")],
         "DecoderConfig.attention_cls = @routed_attention()")
  model = build.build_decoder(0)
  with pytest.raises(ValueError, match=r"DecoderConfig.num_kv_heads=2 is not supported by "
                                       r"attention_cls=RoutedAttention"):
    model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
