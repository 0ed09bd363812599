"""Pattention (TokenFormer): the paper's equation, tau, KV-cache decoding, compute, config size."""
import functools
import math
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adacomp import decoding, gin_utils, training
from adacomp.methods.skipdecode import schedule as skip_schedule
from adacomp.models import build
from adacomp.models.decoder import DecoderConfig, DecoderLM
from layers.pattention import Pattention, PattentionAttention, PattentionFFN

D_IN, D_OUT, N = 12, 20, 24


def paper_pattention(x, k_p, v_p, tau):
  """Eq. 5-6 written out: GeLU(S_i * tau / ||S_i||_2) V_P, S = X K_P^T (exact GeLU, eps 1e-6)."""
  s = x @ k_p.T
  z = s * tau / jnp.sqrt(jnp.sum(s ** 2, axis=-1, keepdims=True) + 1e-6)
  return jax.nn.gelu(z, approximate=False) @ v_p


def _random(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape)


def _layer_params(module, x):
  return nn.meta.unbox(module.init(jax.random.key(0), x)["params"])


def test_pattention_matches_the_papers_equation():
  x = _random((2, 5, D_IN), 0)
  layer = Pattention(N, D_OUT)
  params = {"key": _random((N, D_IN), 1), "value": _random((N, D_OUT), 2)}
  got = layer.apply({"params": params}, x)
  want = paper_pattention(x, params["key"], params["value"], math.sqrt(N))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tau_tokens_fixes_tau_independently_of_the_token_count():
  x = _random((3, D_IN), 0)
  params = {"key": _random((N, D_IN), 1), "value": _random((N, D_OUT), 2)}
  got = Pattention(N, D_OUT, tau_tokens=6).apply({"params": params}, x)
  np.testing.assert_allclose(got, paper_pattention(x, params["key"], params["value"],
                                                   math.sqrt(6)), rtol=1e-5, atol=1e-5)
  default = Pattention(N, D_OUT).apply({"params": params}, x)
  assert not np.allclose(got, default, atol=1e-3)


def test_parameters_have_the_papers_shapes_init_scales_and_axis_names():
  boxed = Pattention(256, 64, key_std=0.02, value_std=0.05).init(
      jax.random.key(0), jnp.zeros((1, 128)))["params"]
  assert boxed["key"].names == ("mlp", "embed") and boxed["value"].names == ("mlp", "embed")
  params = nn.meta.unbox(boxed)
  assert params["key"].shape == (256, 128) and params["value"].shape == (256, 64)
  np.testing.assert_allclose(np.std(params["key"]), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.std(params["value"]), 0.05, rtol=0.05)


def test_pattention_ffn_is_one_pattention_over_the_model_width():
  x = _random((2, 4, D_IN), 0)
  ffn = PattentionFFN(d_ff=999, n_ffn=N)
  params = _layer_params(ffn, x)
  assert jax.tree.map(jnp.shape, params) == {"pattention": {"key": (N, D_IN),
                                                            "value": (N, D_IN)}}
  want = paper_pattention(x, params["pattention"]["key"], params["pattention"]["value"],
                          math.sqrt(N))
  np.testing.assert_allclose(ffn.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)


def test_attention_sows_pattention_and_token_attention_macs():
  b, t, d, h, hd, n_qkv, n_out = 2, 6, 16, 2, 8, 10, 14
  x = _random((b, t, d), 0)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  attn = PattentionAttention(h, hd, n_qkv=n_qkv, n_out=n_out)
  params = nn.meta.unbox(attn.init(jax.random.key(0), x, positions)["params"])
  _, mutables = attn.apply({"params": params}, x, positions, mutable=["intermediates"])
  total = sum(jnp.sum(v) for v in jax.tree.leaves(mutables["intermediates"]))
  per_token = (3 * n_qkv * (d + h * hd) + n_out * (h * hd + d)) * b * t
  token_attention = 2 * h * hd * b * sum(range(1, t + 1))
  np.testing.assert_allclose(total, per_token + token_attention, rtol=1e-6)


def _tokenformer_config(**kw):
  attention = functools.partial(PattentionAttention, n_qkv=12, n_out=10, value_std=0.1)
  ffn = functools.partial(PattentionFFN, n_ffn=40, value_std=0.1)
  base = dict(vocab_size=50, num_layers=3, d_model=32, num_heads=2, head_dim=16, d_ff=64,
              max_len=64, attention_cls=attention, ffn_cls=ffn, norm="layernorm",
              rope_fraction=0.25)
  base.update(kw)
  return DecoderConfig(**base)


def test_kv_cache_decoding_equals_the_full_forward_pass():
  cfg = _tokenformer_config()
  tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, cfg.vocab_size)
  params = nn.meta.unbox(jax.jit(DecoderLM(cfg).init)(jax.random.key(0), tokens)["params"])
  full = jax.jit(DecoderLM(cfg).apply)({"params": params}, tokens)
  got = decoding.teacher_forced_logits(decoding.Decoder(cfg), params, tokens,
                                       skip_schedule.full_schedule(10, cfg.num_layers),
                                       prompt_len=3)
  np.testing.assert_allclose(got, full, rtol=2e-4, atol=2e-4)


def _param_count(gin_file, *bindings):
  gin.clear_config()
  gin_utils.parse([gin_file], bindings)
  model = build.build_decoder(259, DecoderConfig())
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  return training.count_params(shapes["params"])


def test_tokenformer_config_has_about_the_dense_tiny_parameter_count():
  dense = _param_count(os.path.join(gin_utils.CONFIGS_DIR, "dense.gin"))
  tokenformer = _param_count(os.path.join(gin_utils.CONFIGS_DIR, "tokenformer.gin"))
  assert abs(tokenformer - dense) / dense < 0.01, (tokenformer, dense)
  gin.clear_config()
  gin_utils.parse([os.path.join(gin_utils.CONFIGS_DIR, "tokenformer.gin")])
  cfg = DecoderConfig()
  assert cfg.norm == "layernorm" and cfg.rope_fraction == 0.25
  # The code's value init, 2 / (L sqrt(d)), read from the config's own sizes.
  assert cfg.ffn_cls.keywords["value_std"] == pytest.approx(2 / (4 * math.sqrt(128)))


def test_parametric_final_norm_is_scale_and_bias_before_the_tied_logits():
  tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, 50)
  default = nn.meta.unbox(DecoderLM(_tokenformer_config()).init(jax.random.key(0), tokens))
  assert "final_norm" not in default["params"]  # the non-parametric default is unchanged
  cfg = _tokenformer_config(final_norm="layernorm_affine")
  params = nn.meta.unbox(DecoderLM(cfg).init(jax.random.key(0), tokens)["params"])
  assert set(params["final_norm"]) == {"scale", "bias"}
  # Scale 0, bias b: every position's logits are b against the tied embedding, E b.
  bias = jax.random.normal(jax.random.key(4), (32,))
  params["final_norm"] = {"scale": jnp.zeros(32), "bias": bias}
  logits = DecoderLM(cfg).apply({"params": params}, tokens)
  expected = np.asarray(params["embed"]["embedding"]) @ np.asarray(bias)
  np.testing.assert_allclose(logits, np.broadcast_to(expected, logits.shape), rtol=1e-5,
                             atol=1e-5)
  # KV-cache decoding applies the same final norm.
  params["final_norm"]["scale"] = jnp.full(32, 1.5)
  full = DecoderLM(cfg).apply({"params": params}, tokens)
  got = decoding.teacher_forced_logits(decoding.Decoder(cfg), params, tokens,
                                       skip_schedule.full_schedule(10, cfg.num_layers),
                                       prompt_len=3)
  np.testing.assert_allclose(got, full, rtol=2e-4, atol=2e-4)
