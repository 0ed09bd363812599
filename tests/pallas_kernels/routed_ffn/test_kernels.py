"""The TPU and GPU routed_ffn kernels, interpreted on CPU, against the reference."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pallas_kernels
from pallas_kernels.routed_ffn import gpu
from pallas_kernels.routed_ffn import reference
from pallas_kernels.routed_ffn import tpu
from tests.pallas_kernels import util

# 61 rows in tiles of 16: tile 2 holds the end of group 2 and skipped rows, tile 3 only skipped
# rows; group 1 is empty; widths cut group 2 inside its first 128-unit block. No size divides
# its block.
M, D, F = 61, 136, 200
SIZES = jnp.array([13, 0, 20], jnp.int32)
WIDTHS = jnp.array([200, 130, 64], jnp.int32)
BLOCKS = dict(block_m=16, block_k=128, block_n=128)
INTERPRET = pytest.mark.parametrize("impl", util.INTERPRETERS)


def _inputs(dtype=jnp.float32, seed=0, m=M, d=D):
  k = util.keys(seed, 3)
  return (util.normal(k[0], (m, d), dtype), util.normal(k[1], (3, d, F), dtype, d ** -0.5),
          util.normal(k[2], (3, F, d), dtype, F ** -0.5))


def _ffn(impl, x, w_in, w_out, sizes=SIZES, widths=WIDTHS):
  return util.jit_call(pallas_kernels.routed_ffn, x, sizes, w_in, w_out, widths, impl=impl,
                       **BLOCKS)


@INTERPRET
def test_gmm_matches_reference_on_ragged_and_empty_groups(impl):
  x, w_in, _ = _inputs()
  kernel, interpret = util.kernel_module(impl, tpu, gpu)
  out = util.jit_call(kernel.gmm, x, w_in, SIZES, n_limit=WIDTHS, interpret=interpret, **BLOCKS)
  util.assert_matches(out, util.jit_call(reference.gmm, x, w_in, SIZES, n_limit=WIDTHS))


@INTERPRET
def test_gmm_with_transposed_rhs_and_k_limit_matches_reference(impl):
  x, _, w_out = _inputs()
  kernel, interpret = util.kernel_module(impl, tpu, gpu)
  out = util.jit_call(kernel.gmm, x, w_out, SIZES, k_limit=WIDTHS, transpose_rhs=True,
                      interpret=interpret, **BLOCKS)
  util.assert_matches(out, util.jit_call(reference.gmm, x, w_out, SIZES, k_limit=WIDTHS,
                                         transpose_rhs=True))


@INTERPRET
def test_tgmm_matches_reference_and_gives_empty_groups_zero(impl):
  x, _, _ = _inputs()
  y = util.normal(util.keys(5, 1)[0], (M, F))
  kernel, interpret = util.kernel_module(impl, tpu, gpu)
  out = util.jit_call(kernel.tgmm, x, y, SIZES, b_limit=WIDTHS, interpret=interpret, **BLOCKS)
  util.assert_matches(out, util.jit_call(reference.tgmm, x, y, SIZES, b_limit=WIDTHS))
  assert not np.asarray(out[1]).any()


@INTERPRET
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_routed_ffn_matches_reference(impl, dtype):
  x, w_in, w_out = _inputs(dtype)
  util.assert_matches(_ffn(impl, x, w_in, w_out), _ffn("xla", x, w_in, w_out))


@INTERPRET
def test_skipped_rows_are_exactly_zero(impl):
  out = np.asarray(_ffn(impl, *_inputs()))
  assert not out[int(SIZES.sum()):].any()
  assert np.isfinite(out).all() and np.abs(out[:int(SIZES.sum())]).min(axis=1).all()


@INTERPRET
def test_no_routed_rows_gives_all_zeros(impl):
  out = _ffn(impl, *_inputs(), sizes=jnp.zeros((3,), jnp.int32))
  np.testing.assert_array_equal(out, 0)


@INTERPRET
def test_units_past_a_groups_width_are_ignored_even_when_nan(impl):
  x, w_in, w_out = _inputs()
  unit = np.arange(F)[None, :] < np.asarray(WIDTHS)[:, None]      # [E, F]
  w_in_nan = jnp.where(unit[:, None, :], w_in, jnp.nan)
  w_out_nan = jnp.where(unit[:, :, None], w_out, jnp.nan)
  util.assert_matches(_ffn(impl, x, w_in_nan, w_out_nan), _ffn("xla", x, w_in, w_out))


@INTERPRET
def test_gradients_match_jax_grad_of_the_reference(impl):
  # Six kernels run (two forward, four backward): a smaller case keeps the interpreter quick,
  # still with an empty group, a straddled tile, a skipped tail and ragged widths.
  x, w_in, w_out = _inputs(m=40, d=128)
  cotangent = util.normal(util.keys(7, 1)[0], (40, 128))
  grads = {i: jax.jit(jax.grad(lambda *a: jnp.sum(_ffn(i, *a) * cotangent), argnums=(0, 1, 2)))(
      x, w_in, w_out) for i in (impl, "xla")}
  for got, want in zip(grads[impl], grads["xla"]):
    util.assert_matches(got, want)


def _visits(sizes, m, tm=16):
  group, in_tile, out_tile, flags = map(np.asarray, tpu.schedule(jnp.array(sizes, jnp.int32), m,
                                                                 tm, for_tgmm=False))
  return group, in_tile, out_tile, flags


def test_tpu_schedule_never_fetches_or_multiplies_an_all_skipped_tile():
  group, in_tile, out_tile, flags = _visits([13, 0, 20], M)
  active = (flags & tpu.ACTIVE) != 0
  assert set(in_tile[active]) == {0, 1, 2}
  [skip_visit] = np.flatnonzero((out_tile == 3) & (flags != 0))
  assert flags[skip_visit] == tpu.FIRST | tpu.LAST            # writes zeros, no matmul
  assert in_tile[skip_visit] == in_tile[skip_visit - 1]       # its inputs are not re-fetched


def test_tpu_schedule_visits_a_straddling_tile_once_per_group():
  group, in_tile, out_tile, flags = _visits([10, 12], 32)
  n = int(((flags & (tpu.ACTIVE | tpu.FIRST | tpu.LAST)) != 0).sum())
  assert list(zip(group[:n], out_tile[:n])) == [(0, 0), (1, 0), (1, 1)]
  assert [f & (tpu.FIRST | tpu.LAST) for f in flags[:n]] == [
      tpu.FIRST, tpu.LAST, tpu.FIRST | tpu.LAST]
  assert not flags[n:].any()


def test_gpu_tiles_of_skipped_rows_loop_over_no_group():
  lo, hi = map(np.asarray, gpu.tile_groups(SIZES, M, 16))
  # Rows 0-12 are group 0, group 1 is empty at row 13, rows 13-32 are group 2, 33-60 skipped.
  np.testing.assert_array_equal(hi - lo + 1, [3, 1, 1, 0])


def test_tpu_backward_schedule_never_visits_an_all_skipped_tile():
  # tgmm (the weight gradients) visits each group's row tiles, and each empty group once to
  # write its zeros; rows 33-60 (tiles 2 partly, 3 wholly) are skipped.
  group, tile, _, flags = map(np.asarray, tpu.schedule(SIZES, M, 16, for_tgmm=True))
  active = (flags & tpu.ACTIVE) != 0
  assert 3 not in set(tile[active])
  assert sorted(zip(group[active], tile[active])) == [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2)]


@pytest.mark.parametrize("kernel, flops", [("gmm", 2 * 512 * 256 * 1024),
                                           ("tgmm", 2 * 512 * 256 * 1024)])
def test_tpu_kernels_give_xla_a_cost_estimate_of_their_matmul_bound(kernel, flops):
  s = jax.ShapeDtypeStruct
  lhs, sizes = s((512, 256), jnp.bfloat16), s((2,), jnp.int32)
  rhs = s((2, 256, 1024), jnp.bfloat16) if kernel == "gmm" else s((512, 1024), jnp.bfloat16)
  module = export.export(jax.jit(getattr(tpu, kernel)), platforms=["tpu"])(
      lhs, rhs, sizes).mlir_module()
  [estimate] = re.findall(r"cost_estimate\\22: \{(.*?)\}", module)
  assert f"\\22flops\\22:{flops}" in estimate.replace(" ", "")
