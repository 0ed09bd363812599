import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adacomp.models.decoder import DecoderConfig, DecoderLM
from layers.attention import MultiHeadAttention
from layers.pattention import PattentionAttention

CFG = DecoderConfig(vocab_size=40, num_layers=3, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                    max_len=64)


def _params(model, ids):
  return nn.meta.unbox(model.init(jax.random.key(0), ids)["params"])


def _scan_to_unrolled(params, num_layers):
  """Splits stacked block params [L, ...] into block_0..block_{L-1}."""
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(num_layers):
    out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
  return out


def test_scanned_and_unrolled_blocks_compute_the_same_function():
  ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 40)
  scanned = DecoderLM(CFG)
  params = _params(scanned, ids)
  unrolled = DecoderLM(DecoderConfig(**{**CFG.__dict__, "scan_layers": False}))
  np.testing.assert_allclose(
      scanned.apply({"params": params}, ids),
      unrolled.apply({"params": _scan_to_unrolled(params, CFG.num_layers)}, ids),
      rtol=1e-5, atol=1e-5)


def test_logits_are_causal():
  ids = jax.random.randint(jax.random.key(1), (1, 10), 0, 40)
  model = DecoderLM(CFG)
  params = _params(model, ids)
  changed = ids.at[0, 6].set((ids[0, 6] + 1) % 40)
  a = model.apply({"params": params}, ids)
  b = model.apply({"params": params}, changed)
  np.testing.assert_allclose(a[0, :6], b[0, :6], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[0, 6:], b[0, 6:])


# The full pass's attention in 4 causal query blocks of 3 rows (t = 12); prefill and decode
# steps attend through the cache, without blocks.
BLOCKED = {"blocks": functools.partial(MultiHeadAttention, causal_block=3),
           "tokenformer_blocks": functools.partial(PattentionAttention, n_qkv=16, n_out=16,
                                                   causal_block=3)}


@pytest.mark.parametrize("scan, attention", [(True, None), (False, None), (True, "blocks"),
                                             (True, "tokenformer_blocks")])
def test_kv_cache_prefill_and_decode_match_the_full_forward_pass(scan, attention):
  cfg = DecoderConfig(**{**CFG.__dict__, "scan_layers": scan})
  if attention:
    cfg = DecoderConfig(**{**cfg.__dict__, "attention_cls": BLOCKED[attention]})
  ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 40)
  params = _params(DecoderLM(cfg), ids)
  full = DecoderLM(cfg).apply({"params": params}, ids)

  decoder = DecoderLM(cfg, decode=True)
  cache = decoder.init(jax.random.key(0), jnp.zeros((2, 16), jnp.int32))["cache"]
  logits, mutated = decoder.apply({"params": params, "cache": cache}, ids[:, :5],
                                  mutable=["cache"])
  steps = [logits]
  cache = mutated["cache"]
  for t in range(5, 12):
    logits, mutated = decoder.apply({"params": params, "cache": cache}, ids[:, t:t + 1],
                                    mutable=["cache"])
    cache = mutated["cache"]
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=2e-4, atol=2e-4)


def test_untied_logits_have_their_own_projection():
  cfg = DecoderConfig(**{**CFG.__dict__, "tied_embeddings": False})
  params = _params(DecoderLM(cfg), jnp.zeros((1, 4), jnp.int32))
  assert params["logits"].shape == (32, 40)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = DecoderConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  ids = jnp.zeros((1, 4), jnp.int32)
  model = DecoderLM(cfg)
  params = _params(model, ids)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert model.apply({"params": params}, ids).dtype == jnp.float32


class _ScaledFFN(nn.Module):
  """An FFN whose output is its input times the imposed route: shows routes reach every layer."""
  d_ff: int
  activation: str = "gelu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, routes=None):
    scale = 1.0 if routes is None else routes[..., None].astype(x.dtype)
    return x * scale


def test_imposed_routes_reach_each_layers_ffn_at_each_token():
  cfg = DecoderConfig(**{**CFG.__dict__, "ffn_cls": _ScaledFFN})
  ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 40)
  scanned = DecoderLM(cfg)
  params = _params(scanned, ids)
  routes = jax.random.randint(jax.random.key(2), (CFG.num_layers, 2, 6), 0, 3)
  got = scanned.apply({"params": params}, ids, routes=routes)
  # Unrolled blocks take routes[i] explicitly: the scan must hand layer i the same slice.
  unrolled = DecoderLM(DecoderConfig(**{**cfg.__dict__, "scan_layers": False}))
  want = unrolled.apply({"params": _scan_to_unrolled(params, CFG.num_layers)}, ids,
                        routes=routes)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  ones = scanned.apply({"params": params}, ids, routes=jnp.ones_like(routes))
  assert not np.allclose(got, ones, atol=1e-4)
  np.testing.assert_allclose(ones, scanned.apply({"params": params}, ids), rtol=1e-5, atol=1e-5)
