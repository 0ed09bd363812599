"""Informed routing and Mixture-of-Depths from imported tiny models: Llama (gated SwiGLU FFN)
and GPT-2 (biased FFN).

The imported FFN is the routed unit's, parameter for parameter (the router, the causal
predictor and its threshold, and the informed forecaster are new); at sparsity 0 every token
executes, so the routed model is the imported one and gives transformers' reference logits
(tests/hf/test_import.py checks the import against them). The forecaster stage
(configs/informed_routing_lff.gin), the router stage (configs/informed_routing.gin) and the
LoRA stage (configs/informed_routing_lora.gin) train from it, and so does the greedy baseline
(configs/mod.gin).
"""
import glob
import json
import os
import pathlib

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from adacomp import checkpointing, decoding, gin_utils, training
from adacomp.methods.skipdecode import schedule as skip_schedule
from adacomp.models import build
from tests.corpus import TINY_GIN, corpus_bindings
from tests.hf.common import assert_logits_close, fixture, import_fixtures, reference

FAST = ("train.num_steps = 3", "train.eval_every = 0", "train.eval_batches = 2",
        "make_manager.save_every = 3", "make_optimizer.decay_steps = 3")
FFN = "['blocks']['ffn']"
NEW = ("router", "causal", "causal_threshold", "forecaster")


def _parse(configs, *bindings):
  gin.clear_config()
  gin_utils.parse(configs, list(bindings), finalize=False)


@pytest.fixture(scope="module", name="imported")
def _imported(tmp_path_factory):
  return import_fixtures(tmp_path_factory.mktemp("imported"))


def _config(workdir: str) -> str:
  return os.path.join(workdir, "config.gin")


def _init_from(model, imported: str):
  """The model's params initialised from the import as train.init_checkpoint does: (params,
  new paths, unused checkpoint paths)."""
  fresh = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return checkpointing.init_params_from(imported, fresh)


def _hf_ffn(family: str) -> dict:
  """The fixture's FFN tensors in DenseFFN's names and layout, stacked over layers."""
  hf = {}
  for f in glob.glob(os.path.join(fixture(family), "*.safetensors")):
    hf.update(load_file(f))
  config = json.loads(pathlib.Path(fixture(family), "config.json").read_text(encoding="utf-8"))
  if family == "gpt2":  # Conv1D weights are stored [in, out] already
    names = {"wi": "mlp.c_fc.weight", "bi": "mlp.c_fc.bias", "wo": "mlp.c_proj.weight",
             "bo": "mlp.c_proj.bias"}
    return {k: np.stack([hf[f"transformer.h.{i}.{v}"] for i in range(config["n_layer"])])
            for k, v in names.items()}
  names = {"wi_gate": "gate_proj", "wi": "up_proj", "wo": "down_proj"}  # nn.Linear: [out, in]
  return {k: np.stack([hf[f"model.layers.{i}.mlp.{v}.weight"].T
                       for i in range(config["num_hidden_layers"])]) for k, v in names.items()}


def _assert_imported_ffn(ffn: dict, family: str = "llama"):
  want = _hf_ffn(family)
  assert set(k for k in ffn if k[:2] in ("wi", "wo", "bi", "bo")) == set(want)
  for name, value in want.items():
    np.testing.assert_array_equal(ffn[name], value)


@pytest.mark.parametrize("family, config, bindings", [
    ("llama", "configs/informed_routing_lff.gin", ()),
    ("llama", "configs/informed_routing.gin", ("SPARSITY = 0.0", "routed_ffn.compute = 'gather'")),
    ("llama", "configs/mod.gin", ("SPARSITY = 0.0",)),
    ("gpt2", "configs/informed_routing.gin", ("SPARSITY = 0.0", "routed_ffn.compute = 'gather'")),
    ("gpt2", "configs/mod.gin", ("SPARSITY = 0.0", "routed_ffn.decision = 'causal'")),
])
def test_routed_model_at_sparsity_zero_gives_transformers_logits(family, config, bindings,
                                                                 imported):
  _parse([config, _config(imported[family])], *bindings)
  model = build.build_decoder(0)
  params, new, unused = _init_from(model, imported[family])
  assert unused == []
  _assert_imported_ffn(params["blocks"]["ffn"], family)  # the pretrained FFN is the routed unit
  assert new and all(p.startswith(FFN) and p[len(FFN) + 2:].split("'")[0] in NEW for p in new)
  assert any("forecaster" in p for p in new) == ("mod" not in config)
  ref = reference(family)
  assert_logits_close(model.apply({"params": params}, ref["ids"]), ref["logits"])


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def _trained_ffn(workdir: str) -> dict:
  _, meta = gin_utils.parse_checkpoint_config(workdir)
  _, params = build.load_decoder(workdir, meta, checkpointing.read_meta(workdir)[0])
  return params["blocks"]["ffn"]


def test_informed_routing_and_mod_train_from_an_imported_llama(corpus, imported, tmp_path,
                                                               capsys):
  imported = imported["llama"]
  config = _config(imported)
  common = corpus_bindings(corpus) + list(FAST)
  lff = str(tmp_path / "lff")
  _parse(["configs/informed_routing_lff.gin", TINY_GIN, config],
         *common, f"train.init_checkpoint = '{imported}'")
  training.train(lff)
  said = capsys.readouterr().out
  # New: the router and the causal predictor (kernel and bias of 2 layers each), the threshold,
  # the forecaster's down and up; nothing of the import is unused.
  assert f"Initialised params from {imported}; {4 + 4 + 1 + 2} new parameter(s)" in said
  assert f"{FFN}['forecaster']" in said and "unused" not in said
  assert np.all(np.isfinite(_losses(lff))) and _losses(lff)
  _assert_imported_ffn(_trained_ffn(lff))  # only the forecasters trained: the FFN is Llama's
  # The router stage from the forecaster stage (only the routers train).
  router = str(tmp_path / "router")
  _parse(["configs/informed_routing.gin", TINY_GIN, config],
         *common, f"train.init_checkpoint = '{lff}'")
  training.train(router)
  assert np.all(np.isfinite(_losses(router))) and _losses(router)
  _assert_imported_ffn(_trained_ffn(router))
  # The LoRA stage from the router stage: an adapter on each of the three gated matrices.
  capsys.readouterr()
  _parse(["configs/informed_routing_lora.gin", TINY_GIN, config],
         *common, f"train.init_checkpoint = '{router}'")
  training.train(str(tmp_path / "lora"))
  said = capsys.readouterr().out
  assert "6 new parameter(s)" in said and all(
      f"{FFN}['lora_{m}']['{w}']" in said for m in ("wi_gate", "wi", "wo") for w in "ab")
  assert np.all(np.isfinite(_losses(tmp_path / "lora"))) and _losses(tmp_path / "lora")
  _assert_imported_ffn(_trained_ffn(tmp_path / "lora"))  # the base stays frozen
  # Mixture-of-Depths from the import (the whole model trains with its routers).
  _parse(["configs/mod.gin", TINY_GIN, config],
         *common, f"train.init_checkpoint = '{imported}'")
  training.train(str(tmp_path / "mod"))
  said = capsys.readouterr().out
  assert f"{4 + 4 + 1} new parameter(s)" in said and "forecaster" not in said  # no forecaster
  assert "unused" not in said
  assert np.all(np.isfinite(_losses(tmp_path / "mod"))) and _losses(tmp_path / "mod")


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_routed_llama_decodes_token_by_token_as_its_causal_pass(sparsity, imported):
  """The KV-cache decoder (generation) on the routed Llama with causal decisions: at sparsity 0
  transformers' reference logits, at 0.5 the full causal-decision pass (not the dense model:
  some tokens' FFNs take the forecast, zero from the fresh forecaster)."""
  _parse(["configs/informed_routing.gin", _config(imported["llama"])], f"SPARSITY = {sparsity}",
         "routed_ffn.decision = 'causal'", "routed_ffn.compute = 'gather'")
  model = build.build_decoder(0)
  params, _, _ = _init_from(model, imported["llama"])
  ref = reference("llama")
  decoder = decoding.Decoder(model.config)
  sched = skip_schedule.full_schedule(ref["ids"].shape[1], model.config.num_layers)
  logits = decoding.teacher_forced_logits(decoder, params, ref["ids"], sched, prompt_len=3)
  full = model.apply({"params": params}, ref["ids"])
  assert_logits_close(logits, full)
  if sparsity == 0.0:  # causal decisions at sparsity 0: the imported model, decoded or not
    assert_logits_close(full, ref["logits"])
    assert_logits_close(logits, ref["logits"])
  else:
    assert np.abs(np.asarray(full) - ref["logits"]).max() > 1e-2
