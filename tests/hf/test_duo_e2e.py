"""Duo-LLM from imported tiny models: GPT-2 (biased FFN) and Llama (gated SwiGLU FFN).

The imported FFN is Duo's big FFN, parameter for parameter (the small FFN and router are new);
with every route BIG the Duo model is the imported model, so it gives transformers' reference
logits (tests/hf/test_import.py checks the import against them); stage 1 (configs/duo.gin) and
the router stage (configs/duo_router.gin) train from it.
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

from adacomp import checkpointing, gin_utils, training
from adacomp.models import build
from tests.corpus import TINY_GIN, corpus_bindings
from tests.hf.common import assert_logits_close, fixture, import_fixtures, reference

FAST = ("train.num_steps = 3", "train.eval_every = 0", "train.eval_batches = 2",
        "make_manager.save_every = 3", "make_optimizer.decay_steps = 3")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def _char_tokenizer(corpus_glob: str, directory: str) -> list:
  """Gin bindings of a character-level `tokenizer.json` of the corpus: the GPT-2 fixture's
  vocabulary (96 ids) is too small for the byte tokenizer (259) and it has no tokenizer."""
  from tokenizers import Tokenizer, models  # pylint: disable=g-import-not-at-top
  text = "".join(pathlib.Path(f).read_text(encoding="utf-8")
                 for f in sorted(glob.glob(corpus_glob)))
  vocab = {t: i for i, t in enumerate(SPECIALS + tuple(sorted(set(text))))}
  assert len(vocab) <= 96
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok.add_special_tokens(list(SPECIALS))
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  return ["get_tokenizer.kind = 'hf'", f"get_tokenizer.hf_tokenizer_path = '{path}'",
          "get_tokenizer.bos_id = 1", "get_tokenizer.eos_id = 2", "get_tokenizer.pad_id = 0"]


@pytest.fixture(scope="module", name="imported")
def _imported(tmp_path_factory):
  return import_fixtures(tmp_path_factory.mktemp("imported"))


def _config(workdir: str) -> str:
  return os.path.join(workdir, "config.gin")


def _parse(configs, *bindings):
  gin.clear_config()
  gin_utils.parse(configs, list(bindings), finalize=False)


def _duo_from(imported: str):
  """configs/duo.gin's model on the imported sizes, its params initialised from the import as
  train.init_checkpoint does: (model, params, new paths, unused checkpoint paths)."""
  model = build.build_decoder(0)
  fresh = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return (model, *checkpointing.init_params_from(imported, fresh))


def _hf_ffn(family: str) -> dict:
  """The fixture's FFN tensors in DenseFFN's names and layout, stacked over layers."""
  hf = {}
  for f in glob.glob(os.path.join(fixture(family), "*.safetensors")):
    hf.update(load_file(f))
  config = json.loads(pathlib.Path(fixture(family), "config.json").read_text(encoding="utf-8"))
  n = config["n_layer" if family == "gpt2" else "num_hidden_layers"]
  if family == "gpt2":  # Conv1D weights are stored [in, out] already
    names = {"wi": "mlp.c_fc.weight", "bi": "mlp.c_fc.bias", "wo": "mlp.c_proj.weight",
             "bo": "mlp.c_proj.bias"}
    return {k: np.stack([hf[f"transformer.h.{i}.{v}"] for i in range(n)]) for k, v in names.items()}
  names = {"wi_gate": "gate_proj", "wi": "up_proj", "wo": "down_proj"}  # nn.Linear: [out, in]
  return {k: np.stack([hf[f"model.layers.{i}.mlp.{v}.weight"].T for i in range(n)])
          for k, v in names.items()}


@pytest.mark.parametrize("compute", ["masked", "gather", "sorted"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_all_big_duo_on_an_imported_model_gives_transformers_logits(family, compute, imported):
  _parse(["configs/duo.gin", _config(imported[family])], "duo_ffn.mode = 'big'",
         f"duo_ffn.compute = '{compute}'")
  model, params, new, unused = _duo_from(imported[family])
  assert unused == []
  ffn = params["blocks"]["ffn"]
  for name, want in _hf_ffn(family).items():  # the pretrained FFN is Duo's big FFN, exactly
    np.testing.assert_array_equal(ffn[name], want)
  router = [p for p in new if p.startswith("['blocks']['ffn']['router']")]
  assert router and sorted(set(new) - set(router)) == sorted(
      f"['blocks']['ffn']['{k}_small']" for k in _hf_ffn(family))  # the rest is imported
  ref = reference(family)
  assert_logits_close(model.apply({"params": params}, ref["ids"]), ref["logits"])


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_duo_stages_train_from_an_imported_model(family, corpus, imported, tmp_path, capsys):
  imported = imported[family]
  config = _config(imported)
  tokenizer = _char_tokenizer(corpus["glob"], str(tmp_path)) if family == "gpt2" else []
  common = corpus_bindings(corpus) + list(FAST) + tokenizer
  stage1 = str(tmp_path / "duo")
  _parse(["configs/duo.gin", TINY_GIN, config],
         *common, f"train.init_checkpoint = '{imported}'")
  training.train(stage1)
  said = capsys.readouterr().out
  assert f"Initialised params from {imported}" in said and "new parameter(s)" in said
  assert "['blocks']['ffn']['wi_small']" in said and "unused" not in said
  losses = _losses(stage1)
  assert losses and np.all(np.isfinite(losses))
  # The router stage from stage 1 (only the routers train).
  _parse(["configs/duo_router.gin", TINY_GIN, config],
         *common, f"train.init_checkpoint = '{stage1}'")
  training.train(str(tmp_path / "router"))
  losses = _losses(tmp_path / "router")
  assert losses and np.all(np.isfinite(losses))
