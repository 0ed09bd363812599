"""routed_ffn's forward and backward written with two grouped matmuls (the megablox split).

Given `gmm(lhs, rhs, group_sizes, k_limit=, n_limit=, transpose_rhs=)` and
`tgmm(lhs, rhs, group_sizes, a_limit=, b_limit=, out_dtype=)` of one backend:

    forward   pre = gmm(x, w_in, n_limit=widths)            [m, F], zero past a group's width
              h   = act(pre)                                 (XLA, elementwise)
              out = gmm(h, w_out, k_limit=widths)            [m, d]
    backward  dh    = gmm(dy, w_out^T, n_limit=widths)
              dpre  = act'(pre) * dh                         (XLA, elementwise)
              dx    = gmm(dpre, w_in^T, k_limit=widths)
              dw_in = tgmm(x, dpre, b_limit=widths), dw_out = tgmm(h, dy, a_limit=widths)

Skipped rows cost nothing in any of the four grouped matmuls. `pre` is the only residual
beyond the inputs. act(0) = 0 for every supported activation, so h is zero past a group's width.
"""
import jax
import jax.numpy as jnp

from pallas_kernels.routed_ffn import reference


def _varying(a) -> frozenset:
  return frozenset(jax.typeof(a).manual_axis_type.varying)


def match_varying(*arrays):
  """Inside a shard_map (check_vma on, so autodiff through its psums is exact): every operand
  of a pallas_call cast to vary over the union of the mesh axes any of them varies over, the
  one variance a pallas_call takes and returns. Outside a shard_map: unchanged."""
  axes = frozenset().union(*(_varying(a) for a in arrays))
  return tuple(jax.lax.pcast(a, tuple(sorted(axes - _varying(a))), to="varying")
               for a in arrays)


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """A pallas_call's out_shape, varying as `like` (a match_varying operand) does."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def sum_to_variance_of(grad, primal):
  """A cotangent summed over the mesh axes it varies over and its primal does not: the
  gradient of an operand replicated over an axis is the sum of the shards' gradients (what
  jax's own transpose of the implicit pcast does; a custom VJP must write it out)."""
  axes = tuple(sorted(_varying(grad) - _varying(primal)))
  return jax.lax.psum(grad, axes) if axes else grad


def build(gmm, tgmm, activation: str):
  """A custom-VJP f(x, group_sizes, w_in, w_out, widths) -> out from one backend's matmuls."""
  act = reference.activation_fn(activation)

  def forward(x, group_sizes, w_in, w_out, widths):
    pre = gmm(x, w_in, group_sizes, n_limit=widths)
    h = act(pre.astype(jnp.float32)).astype(x.dtype)
    return gmm(h, w_out, group_sizes, k_limit=widths), pre

  @jax.custom_vjp
  def ffn(x, group_sizes, w_in, w_out, widths):
    return forward(x, group_sizes, w_in, w_out, widths)[0]

  def ffn_fwd(x, group_sizes, w_in, w_out, widths):
    out, pre = forward(x, group_sizes, w_in, w_out, widths)
    return out, (x, group_sizes, w_in, w_out, widths, pre)

  def ffn_bwd(res, dy):
    x, group_sizes, w_in, w_out, widths, pre = res
    dy = dy.astype(x.dtype)
    h, act_vjp = jax.vjp(lambda p: act(p.astype(jnp.float32)), pre)
    dh = gmm(dy, w_out, group_sizes, n_limit=widths, transpose_rhs=True)
    dpre = act_vjp(dh.astype(jnp.float32))[0].astype(x.dtype)
    dx = gmm(dpre, w_in, group_sizes, k_limit=widths, transpose_rhs=True)
    dw_in = tgmm(x, dpre, group_sizes, b_limit=widths, out_dtype=w_in.dtype)
    dw_out = tgmm(h.astype(x.dtype), dy, group_sizes, a_limit=widths, out_dtype=w_out.dtype)
    grads = [sum_to_variance_of(g, p) for g, p in ((dx, x), (dw_in, w_in), (dw_out, w_out))]
    return grads[0], None, grads[1], grads[2], None

  ffn.defvjp(ffn_fwd, ffn_bwd)
  return ffn
