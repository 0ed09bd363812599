import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import MultiHeadAttention
from layers.rope import apply_rope


def _naive_attention(x, params, positions, num_heads, head_dim):
  """Per-head loops with numpy: the textbook causal attention with RoPE."""
  p = jax.tree.map(np.asarray, params)
  q = np.einsum("btd,dhk->bthk", x, p["query"])
  k = np.einsum("btd,dhk->bthk", x, p["key"])
  v = np.einsum("btd,dhk->bthk", x, p["value"])
  q = np.asarray(apply_rope(jnp.asarray(q), positions))
  k = np.asarray(apply_rope(jnp.asarray(k), positions))
  b, t = x.shape[:2]
  out = np.zeros((b, t, num_heads, head_dim))
  for bi in range(b):
    for h in range(num_heads):
      s = q[bi, :, h] @ k[bi, :, h].T / np.sqrt(head_dim)
      s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[bi, :, h] = w @ v[bi, :, h]
  return np.einsum("bthk,hkd->btd", out, p["out"])


@pytest.mark.parametrize("t, causal_block", [(7, 128), (8, 2)])  # one block; 4 blocks of 2
def test_attention_matches_textbook_causal_attention(t, causal_block):
  b, d, h, hd = 2, 16, 2, 8
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  module = MultiHeadAttention(h, hd, causal_block=causal_block)
  params = jax.tree.map(lambda v: v.value if hasattr(v, "value") else v,
                        module.init(jax.random.key(1), x, positions)["params"],
                        is_leaf=lambda v: hasattr(v, "value"))
  got = module.apply({"params": params}, x, positions)
  want = _naive_attention(np.asarray(x), params, positions, h, hd)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

  def score(pq, pk):
    rq = apply_rope(q, jnp.array([[pq]]))
    rk = apply_rope(k, jnp.array([[pk]]))
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
  assert abs(score(5, 2) - score(5, 4)) > 1e-4


def test_partial_rope_leaves_the_unrotated_features_alone():
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 16))
  y = apply_rope(x, jnp.array([[4, 5, 6]]), fraction=0.25)
  np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
  assert not np.allclose(y[..., :4], x[..., :4])


def _init(module, x, positions):
  return jax.tree.map(np.asarray, nn.meta.unbox(module.init(jax.random.key(1), x, positions)))


def test_grouped_query_attention_equals_attention_with_repeated_kv_heads():
  b, t, d, h, kv, hd = 2, 6, 16, 4, 2, 8
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  gqa = MultiHeadAttention(h, hd, num_kv_heads=kv, qkv_bias=True, out_bias=True)
  variables = _init(gqa, x, positions)
  p = variables["params"]
  assert p["key"].shape == (d, kv, hd) and p["query"].shape == (d, h, hd)
  # Query head i reads kv head i // (h / kv): repeat each kv head h / kv times.
  rep = {n: np.repeat(p[n], h // kv, axis=-2) for n in ("key", "value", "key_bias", "value_bias")}
  mha = MultiHeadAttention(h, hd, qkv_bias=True, out_bias=True)
  want = mha.apply({"params": {**p, **rep}}, x, positions)
  np.testing.assert_allclose(gqa.apply(variables, x, positions), want, rtol=1e-5, atol=1e-5)


def test_sliding_window_matches_a_textbook_banded_mask():
  b, t, d, h, hd, window = 1, 9, 8, 2, 4, 3
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  attn = MultiHeadAttention(h, hd, window=window, rope_fraction=0.0)
  p = _init(attn, x, positions)["params"]
  q, k, v = (np.einsum("btd,dhk->bthk", np.asarray(x), p[n]) for n in ("query", "key", "value"))
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  visible = (j <= i) & (j > i - window)  # the query itself and the window - 1 keys before it
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
  s = np.where(visible, s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  want = np.einsum("bqhk,hkd->bqd", np.einsum("bhqk,bkhd->bqhd", w, v), p["out"])
  np.testing.assert_allclose(attn.apply({"params": p}, x, positions), want, rtol=1e-5, atol=1e-5)


def test_rotate_half_layout_is_the_interleaved_rotation_on_permuted_features():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  positions = jnp.arange(5)[None]
  # Feature i of the first half pairs with i + 4; interleaving the halves gives pairs (2i, 2i+1).
  order = np.stack([np.arange(4), np.arange(4) + 4], axis=-1).reshape(-1)
  half = apply_rope(x, positions, layout="half")
  interleaved = apply_rope(x[..., order], positions, layout="interleaved")
  np.testing.assert_allclose(half[..., order], interleaved, rtol=1e-6, atol=1e-6)


def _softmax_attention(q, k, v, mask):
  """softmax(q k^T / sqrt(d) masked) v per head, kv heads repeated for grouped queries."""
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def test_attention_values_and_gradients_match_the_softmax_formula():
  # dot_product_attention defers the softmax normalisation past the value product and keeps
  # heads leading (the layout XLA runs fast); it must be the same function, gradients too.
  from layers.attention import causal_mask, dot_product_attention  # pylint: disable=g-import-not-at-top
  b, t, hd = 2, 9, 8
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  weights = jax.random.normal(jax.random.key(9), (b, t, 4, hd))
  for kv, window in ((4, None), (2, None), (4, 3), (1, 4)):
    q = jax.random.normal(jax.random.key(kv), (b, t, 4, hd))
    k = jax.random.normal(jax.random.key(kv + 10), (b, t, kv, hd))
    v = jax.random.normal(jax.random.key(kv + 20), (b, t, kv, hd))
    mask = causal_mask(positions, positions, window)
    got = dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(got, _softmax_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda *qkv: jnp.sum(f(*qkv, mask) * weights)
    got_g = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    want_g = jax.grad(loss(_softmax_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got_g, want_g):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # bfloat16 activations: the same function to bfloat16's precision.
    bf = dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), mask, jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf.astype(jnp.float32), got, atol=0.06)


def test_causal_query_blocks_are_the_same_function_values_and_gradients():
  # blocks > 1: query block i reads key blocks 0..i only (the keys after it are all masked in
  # causal self-attention), the softmax formula over the whole masked square, grads too.
  from layers.attention import causal_blocks, causal_mask, dot_product_attention  # pylint: disable=g-import-not-at-top
  b, t, hd = 2, 12, 8
  positions = 5 + jnp.broadcast_to(jnp.arange(t), (b, t))  # a cache offset: still increasing
  weights = jax.random.normal(jax.random.key(3), (b, t, 4, hd))
  for kv, window, blocks in ((2, None, 3), (4, 5, 4), (1, None, 2)):
    q = jax.random.normal(jax.random.key(kv + blocks), (b, t, 4, hd))
    k = jax.random.normal(jax.random.key(kv + 10), (b, t, kv, hd))
    v = jax.random.normal(jax.random.key(kv + 20), (b, t, kv, hd))
    mask = causal_mask(positions, positions, window)
    # Output and gradients, compiled (op by op the blocks are slow to run).
    def out_and_grads(f, mask=mask):
      loss = lambda *qkv: jnp.sum(f(*qkv, mask) * weights)
      return jax.jit(lambda *qkv: (f(*qkv, mask), jax.grad(loss, argnums=(0, 1, 2))(*qkv)))

    got, got_g = out_and_grads(functools.partial(dot_product_attention, blocks=blocks))(q, k, v)
    want, want_g = out_and_grads(_softmax_attention)(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_g, want_g):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  # What the blocks save: XLA's compiled FLOPs fall to about (n + 1) / 2n of the square's.
  q = jnp.zeros((1, 64, 2, 16))
  square = jnp.broadcast_to(jnp.arange(64), (1, 64))
  mask = causal_mask(square, square)

  def flops(blocks):
    cost = jax.jit(lambda q: dot_product_attention(q, q, q, mask, blocks=blocks)).lower(
        q).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  for blocks in (2, 4):
    executed = (blocks + 1) / (2 * blocks)
    assert executed <= flops(blocks) / flops(1) < executed + 0.03
  # The split: n blocks dividing t, at least two; otherwise the whole square.
  assert [causal_blocks(t, 128) for t in (256, 512, 384, 300, 2048, 200, 128)] == [
      2, 4, 3, 2, 8, 1, 1]  # at most 8 blocks, each of at least 128 rows, dividing t
  assert causal_blocks(256, 0) == 1
  with pytest.raises(ValueError, match="self-attention"):  # more keys than queries
    dot_product_attention(jnp.zeros((1, 4, 2, hd)), jnp.zeros((1, 6, 2, hd)),
                          jnp.zeros((1, 6, 2, hd)), jnp.ones((1, 1, 4, 6), bool), blocks=2)
