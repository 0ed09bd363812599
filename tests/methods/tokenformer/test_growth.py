"""TokenFormer growth: function preservation per init, gradients, grow-then-resume, bad input."""
import dataclasses
import functools
import json
import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adacomp import checkpointing, gin_utils, training
from adacomp.methods.tokenformer import growth as scaling
from adacomp.models.decoder import DecoderConfig, DecoderLM
from layers.pattention import Pattention, PattentionAttention, PattentionFFN
from tests.corpus import configure

TOKENFORMER = ["DecoderConfig.attention_cls = @tokenformer_attention()",
               "DecoderConfig.ffn_cls = @tokenformer_ffn()", "DecoderConfig.norm = 'layernorm'",
               "DecoderConfig.rope_fraction = 0.25", "tokenformer_attention.n_qkv = 8",
               "tokenformer_attention.n_out = 6", "tokenformer_ffn.n_ffn = 16"]


@functools.lru_cache(maxsize=None)  # one config object per size, so _jitted reuses its compiles
def _config(n_qkv=8, n_out=6, n_ffn=16, tau=(None, None, None)):
  attention = functools.partial(PattentionAttention, n_qkv=n_qkv, n_out=n_out, value_std=0.1,
                                tau_tokens_qkv=tau[0], tau_tokens_out=tau[1])
  ffn = functools.partial(PattentionFFN, n_ffn=n_ffn, value_std=0.1, tau_tokens=tau[2])
  return DecoderConfig(vocab_size=40, num_layers=2, d_model=16, num_heads=2, head_dim=8,
                       d_ff=32, max_len=32, attention_cls=attention, ffn_cls=ffn,
                       norm="layernorm", rope_fraction=0.25)


TOKENS = jax.random.randint(jax.random.key(5), (2, 12), 0, 40)


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
  """The config's jitted init (from a key) and apply, compiled once per config."""
  model = DecoderLM(cfg)
  return jax.jit(lambda key: model.init(key, TOKENS)), jax.jit(model.apply)


def _init(cfg, seed):
  return nn.meta.unbox(_jitted(cfg)[0](jax.random.key(seed))["params"])


def _logits(cfg, params):
  return _jitted(cfg)[1]({"params": params}, TOKENS)


@pytest.fixture(scope="module", name="small")
def _small():
  """A small TokenFormer whose keys are not at init (trained-like scales: std 0.3)."""
  params = _init(_config(), 0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 15 if jax.tree_util.keystr(p).endswith("['key']") else v, params)
  return params, _logits(_config(), params)


def _grow(params, init, key_std=0.02, fixed_tau=True):
  plans = scaling.plan_growth(params, factor=2)
  grown_cfg = _config(16, 12, 32, tau=(8, 6, 16) if fixed_tau else (None, None, None))
  grown = scaling.grow_params(params, _init(grown_cfg, 1), plans, init=init, key_std=key_std)
  return grown_cfg, grown


def test_zero_key_growth_preserves_the_model_exactly(small):
  params, logits = small
  cfg, grown = _grow(params, "zero_keys")
  got = _logits(cfg, grown)
  np.testing.assert_allclose(got, logits, rtol=0, atol=2e-5)
  # The new values are random (the grown model's init), not zero: they can learn.
  new_values = np.asarray(grown["blocks"]["ffn"]["pattention"]["value"])[:, 16:]
  assert np.std(new_values) > 0.05


def test_growth_with_tau_sqrt_n_new_changes_the_function(small):
  params, logits = small
  cfg, grown = _grow(params, "zero_keys", fixed_tau=False)
  got = _logits(cfg, grown)
  assert np.max(np.abs(got - logits)) > 1e-2


def test_zero_value_growth_is_the_old_layer_with_each_rows_tau_shrunk():
  x = jax.random.normal(jax.random.key(0), (7, 10))
  k_old, v_old = (jax.random.normal(jax.random.key(i), s) for i, s in ((1, (8, 10)),
                                                                          (2, (8, 5))))
  k_new = 0.3 * jax.random.normal(jax.random.key(3), (8, 10))
  grown = Pattention(16, 5, tau_tokens=8).apply(
      {"params": {"key": jnp.concatenate([k_old, k_new]),
                  "value": jnp.concatenate([v_old, jnp.zeros((8, 5))])}}, x)
  s_old, s_new = x @ k_old.T, x @ k_new.T
  c = jnp.sqrt(jnp.sum(s_old ** 2, -1) / (jnp.sum(s_old ** 2, -1) + jnp.sum(s_new ** 2, -1)))
  z = s_old * (c * math.sqrt(8))[:, None] / jnp.linalg.norm(s_old, axis=-1, keepdims=True)
  np.testing.assert_allclose(grown, jax.nn.gelu(z, approximate=False) @ v_old, rtol=1e-4,
                             atol=1e-5)


def test_zero_value_growth_error_is_quadratic_in_the_new_keys_scale(small):
  params, logits = small
  errors = []
  for key_std in (1e-2, 1e-3):
    cfg, grown = _grow(params, "zero_values", key_std=key_std)
    errors.append(np.max(np.abs(_logits(cfg, grown) - logits)))
  assert errors[0] > 1e-5
  # 10x smaller keys: ~100x smaller error (float32 noise ~1e-6 bounds the small end).
  assert errors[1] < errors[0] / 30 + 2e-6, errors


def test_both_zero_new_tokens_get_zero_gradients_zero_keys_alone_do_not():
  x = jax.random.normal(jax.random.key(0), (6, 10))
  k_old, v_old = jax.random.normal(jax.random.key(1), (8, 10)), jax.random.normal(
      jax.random.key(2), (8, 4))
  target = jax.random.normal(jax.random.key(3), (6, 4))

  @jax.jit
  def new_token_grads(v_new):
    def loss(k_new, v_new):
      k = jnp.concatenate([k_old, k_new])
      v = jnp.concatenate([v_old, v_new])
      y = Pattention(12, 4, tau_tokens=8).apply({"params": {"key": k, "value": v}}, x)
      return jnp.sum((y - target) ** 2)
    return jax.grad(loss, argnums=(0, 1))(jnp.zeros((4, 10)), v_new)

  g_key, g_value = new_token_grads(jnp.zeros((4, 4)))
  assert np.all(np.asarray(g_key) == 0) and np.all(np.asarray(g_value) == 0)
  g_key, g_value = new_token_grads(jax.random.normal(jax.random.key(4), (4, 4)))
  assert np.max(np.abs(g_key)) > 1e-3 and np.all(np.asarray(g_value) == 0)


def test_plan_growth_rejects_bad_selections(small):
  params, _ = small
  with pytest.raises(scaling.GrowthError, match="matches no Pattention"):
    scaling.plan_growth(params, select="nothing_like_this", add=4)
  with pytest.raises(scaling.GrowthError, match="part of group 'qkv'"):
    scaling.plan_growth(params, select="attn/query", add=4)
  with pytest.raises(scaling.GrowthError, match="exactly one"):
    scaling.plan_growth(params, add=4, factor=2)
  dense = _init(dataclasses.replace(_config(), attention_cls=DecoderConfig.attention_cls,
                                    ffn_cls=DecoderConfig.ffn_cls), 0)
  with pytest.raises(scaling.GrowthError, match="not a TokenFormer"):
    scaling.plan_growth(dense, add=4)
  plans = scaling.plan_growth(params, select="ffn", add=4, tau_tokens={"ffn": 12})
  assert list(plans) == ["ffn"] and (plans["ffn"].old, plans["ffn"].new,
                                     plans["ffn"].tau_tokens) == (16, 20, 12)


def _restore(workdir):
  root = checkpointing.checkpoint_root(str(workdir))
  with ocp.CheckpointManager(root, item_names=("params", "opt_state")) as manager:
    step = manager.latest_step()
    got = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore()))
  return step, got["params"], got["opt_state"]


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_grow_then_resume_keeps_state_and_continues_training(corpus, tmp_path):
  source, target = tmp_path / "small", tmp_path / "grown"
  configure(corpus, *TOKENFORMER, "train.num_steps = 2", "make_optimizer.decay_steps = 4",
            "train.eval_every = 0")
  training.train(str(source))
  gin.clear_config()
  summary = scaling.grow_checkpoint(str(source), str(target), factor=2, log=lambda _: None)
  assert summary["step"] == 2 and summary["decay_steps"] == 4
  assert {g: (p["old"], p["new"], p["tau_tokens"]) for g, p in summary["groups"].items()} == {
      "qkv": (8, 16, 8), "out": (6, 12, 6), "ffn": (16, 32, 16)}
  config = (target / "config.gin").read_text()
  assert "tokenformer_ffn.n_ffn = 32" in config and "tokenformer_ffn.tau_tokens = 16" in config

  _, src_params, src_opt = _restore(source)
  step, params, opt_state = _restore(target)
  assert step == 2
  ffn = params["blocks"]["ffn"]["pattention"]
  assert ffn["key"].shape == (2, 32, 32) and ffn["value"].shape == (2, 32, 32)
  np.testing.assert_array_equal(ffn["key"][:, :16], src_params["blocks"]["ffn"]["pattention"][
      "key"])
  assert np.all(np.asarray(ffn["key"][:, 16:]) == 0)
  src, new = _flat(src_opt), _flat(opt_state)
  assert src.keys() == new.keys()
  grown_leaves = 0
  for name, old in src.items():
    if old.shape == new[name].shape:
      np.testing.assert_array_equal(new[name], old)
    else:
      grown_leaves += 1
      n = old.shape[-2]
      np.testing.assert_array_equal(new[name][..., :n, :], old)
      assert np.all(new[name][..., n:, :] == 0), name
  assert grown_leaves == 2 * 2 * 5  # mu and nu of key and value of 5 Pattention arrays
  assert (target / "checkpoints" / "2" / "data" / "process_0-of-1.json").read_text() == (
      source / "checkpoints" / "2" / "data" / "process_0-of-1.json").read_text()

  gin.clear_config()  # as train.py --gin_file=target/config.gin --gin_bindings=...
  gin_utils.parse([str(target / "config.gin")], ["train.num_steps = 4"], finalize=False)
  training.train(str(target))
  records = [json.loads(line) for line in open(target / "metrics.jsonl")]
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == [4] and all(math.isfinite(r["loss"]) for r in records)
  step, params, _ = _restore(target)
  assert step == 4 and params["blocks"]["ffn"]["pattention"]["key"].shape == (2, 32, 32)
  # The new keys left zero: training moves the grown tokens.
  assert np.max(np.abs(np.asarray(params["blocks"]["ffn"]["pattention"]["key"])[:, 16:])) > 0


def test_grow_refuses_missing_checkpoint_and_non_empty_target(tmp_path):
  with pytest.raises(scaling.GrowthError, match="No complete checkpoint"):
    scaling.grow_checkpoint(str(tmp_path / "nothing"), str(tmp_path / "out"), factor=2)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "file").write_text("x")
  with pytest.raises(scaling.GrowthError, match="not empty"):
    scaling.grow_checkpoint(str(tmp_path / "nothing"), str(tmp_path / "full"), factor=2)
