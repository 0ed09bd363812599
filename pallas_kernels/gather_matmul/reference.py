"""The specification of gather_matmul and scatter, in plain jnp.

    gather_matmul(x [m, d], idx [k], w [d, n]) = x[idx] @ w                       [k, n]
    scatter(y [k, n], idx [k], out [m, n], "add") = out with out[idx[i]] += y[i]
    scatter(y [k, n], idx [k], out [m, n], "set") = out with out[idx[i]]  = y[i]

Indices are clipped to [0, m) and must be distinct (what top-k returns). The matmul
accumulates in f32 and rounds once to x.dtype; "add" adds in f32 and rounds once to out.dtype.
"""
import jax.numpy as jnp


def gather_matmul(x, idx, w):
  rows = jnp.take(x, idx, axis=0, mode="clip")
  return jnp.dot(rows, w, preferred_element_type=jnp.float32).astype(x.dtype)


def scatter(y, idx, out, *, mode="add"):
  idx = jnp.clip(idx, 0, out.shape[0] - 1)
  if mode == "set":
    return out.at[idx].set(y.astype(out.dtype), unique_indices=True)
  summed = jnp.take(out, idx, axis=0).astype(jnp.float32) + y.astype(jnp.float32)
  return out.at[idx].set(summed.astype(out.dtype), unique_indices=True)
