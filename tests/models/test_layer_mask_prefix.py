"""SkipDecode training in prefix compute: each layer runs on the positions it is active at."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adacomp.methods.skipdecode import schedule
from adacomp.models.decoder import DecoderConfig, DecoderLM, prefix_lengths

L, T = 4, 24


def _mask():
  active = schedule.schedule_for_speedup(T, L, speedup=2.0, warmup_len=4, warmup_layers=1)
  return schedule.active_layer_mask(active, L, warmup_layers=1)


def _model(compute, scan=True):
  cfg = DecoderConfig(vocab_size=37, num_layers=L, d_model=32, num_heads=2, head_dim=16,
                      d_ff=64, scan_layers=scan, layer_mask_compute=compute)
  return DecoderLM(cfg)


def test_prefix_lengths_are_each_layers_active_prefix():
  mask = _mask()
  lengths = prefix_lengths(mask)
  assert lengths is not None and lengths[0] == T  # the warm-up layer runs everywhere
  for i, n in enumerate(lengths):
    np.testing.assert_array_equal(mask[i], np.arange(T) < n)
  assert min(lengths) < T  # the schedule skips somewhere
  holes = mask.copy()
  holes[0, 1] = False
  assert prefix_lengths(holes) is None  # not a prefix: the masked path runs
  assert prefix_lengths(jnp.asarray(mask)) is None  # traced / device masks: not static


@pytest.mark.parametrize("scan", [True, False])
def test_prefix_compute_gives_the_masked_logits_and_gradients(scan):
  mask = _mask()
  ids = jax.random.randint(jax.random.key(0), (2, T), 0, 37)
  masked, prefix = _model("masked", scan), _model("prefix", scan)
  params = masked.init(jax.random.key(1), ids)["params"]
  weight = jax.random.normal(jax.random.key(2), (2, T, 37))

  def loss(p, model):
    logits, _ = model.apply({"params": p}, ids, layer_mask=mask, mutable=["losses"])
    return jnp.sum(jnp.sin(logits) * weight)

  want, got = (jax.jit(jax.value_and_grad(lambda p, m=m: loss(p, m)))(params)
               for m in (masked, prefix))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max())), got[1], want[1])
  # Evaluation (intermediates collected) keeps the masked path: same logits either way.
  full = jax.jit(lambda p: masked.apply({"params": p}, ids, layer_mask=mask))(params)
  logits, _ = jax.jit(lambda p: prefix.apply({"params": p}, ids, layer_mask=mask,
                                             mutable=["losses"]))(params)
  np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)


def test_prefix_compute_executes_the_scheduled_fraction_of_the_blocks():
  """XLA's compiled FLOPs of the forward (layers unrolled: XLA counts a scanned loop's body
  once): the blocks' FLOPs fall to the mean p_l / t of the masked path's."""
  mask = _mask()
  ids = jnp.zeros((2, T), jnp.int32)
  params = _model("masked", scan=False).init(jax.random.key(1), ids)["params"]

  def flops(model, m):
    fn = jax.jit(lambda p: model.apply({"params": p}, ids, layer_mask=m, mutable=["losses"])[0])
    cost = fn.lower(params).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

  masked = flops(_model("masked", scan=False), mask)
  prefix = flops(_model("prefix", scan=False), mask)
  no_layers = DecoderLM(dataclasses.replace(_model("masked", scan=False).config, num_layers=0))
  head = flops(no_layers, None)  # embedding, final norm, logits: not masked
  frac = np.mean(prefix_lengths(mask)) / T
  np.testing.assert_allclose((prefix - head) / (masked - head), frac, atol=0.03)
