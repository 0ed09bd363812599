"""Token routing around a unit: informed execute-or-approximate, or greedy execute-or-skip.

Informed routing (arXiv 2510.13831) and its greedy baseline, Mixture-of-Depths (Raposo et al.,
2024, arXiv 2404.02258), in one module per unit type, so both are compared on equal terms.
For a unit u (the FFN, or the attention) whose input is the normed hidden state x_i of token i,
a router scores every token and, per sequence, the k highest-scoring tokens execute:

    y_i = u(x_i)                                 if i is among the top k of its sequence
    y_i = u_hat(x_i) = (x_i A) B    (informed)   otherwise: the Lightweight Feature Forecaster
    y_i = 0                         (greedy)     otherwise: the block is the identity there

and the block adds y_i to the residual stream.

Sparsity. `sparsity` is the fraction of tokens that do NOT execute the unit: 0 is the dense
model (exactly: every token executes, the router does not run, the output is u(x)); 0.75 runs
the unit on a quarter of the tokens. The capacity is static: k = ceil((1 - sparsity) * t)
tokens of each length-t sequence (`layers.selection.capacity_tokens`), so every shape is fixed.

Scores (choices made here; the paper's code is not public):
  * Router: r(x) = W_2 ReLU(W_1 x), d -> d/4 -> ReLU -> outputs (the SkipGPT shape), in
    float32. Greedy: one output, the importance logit a_i; score_i = a_i.
  * Informed: two outputs, the importance logit a_i and e_i, a prediction of the log forecast
    error, regressed onto it (the recoverability head):
        L_recover = w_r * mean_i (e_i - stop_gradient(log(err_i + 1e-6)))^2,
        err_i = mean_features (u(x_i) - u_hat(x_i))^2,
    and score_i = a_i + stop_gradient(e_i): a token executes when it matters (importance) and
    its forecast would be poor (low recoverability).
  * Importance gradient (MoD multiplies the executed unit's output by the router weight). Here
    the straight-through form of that, zero in value, so sparsity 0 stays exactly dense and the
    dense checkpoint's function is the starting point:
        y_i = y_i(hard) + (s_i - stop_gradient(s_i)) * (u(x_i) - u_hat(x_i)),   s_i = sigmoid(a_i),
    with u_hat = 0 for greedy. d loss / d a_i is then the loss's sensitivity to executing token i
    instead of approximating (or skipping) it. The same for both methods, so the comparison is
    fair. The top-k itself has no gradient.
  * Top-k over the whole sequence is not causal (a token's decision depends on later tokens'
    scores). As in MoD, evaluation is teacher-forced with per-sequence top-k; autoregressive
    sampling would need MoD's auxiliary causal predictor, which is not implemented.

Compute paths (`compute`):
  * "masked": the unit and the forecaster on every token, outputs selected by the decision.
    Training: the straight-through term and the recoverability target need u on every token.
  * "gather": inference with real savings. The k executed tokens of each sequence are gathered
    (`pallas_kernels.gather_matmul` for the FFN's first matmul; the attention runs on the
    gathered subsequence with its own positions), the unit runs on them only and the result is
    scattered back (`pallas_kernels.scatter`); informed mode forecasts the t - k others
    (gathered with an XLA gather: the forecaster is small), greedy mode leaves them at zero.
    Same values as "masked". The straight-through term is the masked path's, (s - sg(s)) *
    (u - u_hat), on the executed tokens (so the forecast also runs on those, zero in value);
    it reaches executed tokens only (as in MoD), where the two paths' router gradients agree
    (tested). The gather path costs a per-sequence argsort besides.

Attention unit: skipped (or forecast) tokens are not keys or values for anybody, as in MoD: an
executed token attends to the executed tokens at or before its position. (In "masked" compute a
non-executed token's would-be output, used only by the straight-through term and the
recoverability target, attends to those and to itself.) KV-cache decoding is not supported.

Sown: `losses/forecast_distill` (w_d * mean (stop_gradient(u) - u_hat)^2 over every token, when
`distill_weight` > 0: stage 1 of the informed training), `losses/routing_recoverability`
(informed, router deciding, masked compute), intermediates `executed` (int32 [b, t], 1 where
the unit ran) and `macs` (float32 [b, t]): the unit's MACs for executed tokens, the
forecaster's (informed) or nothing (greedy) for the others, plus the router's for every token
when the router decided. At sparsity 0 that is exactly the dense unit's MACs.

LoRA (RoutedFFN, `lora_rank`): the paper's optional last stage fine-tunes the frozen base with
low-rank adapters after the routers; here both FFN matrices get one (`layers.lora`), W_in
inside the activation and W_out on the hidden state: u(x) = (act(x W_in + LoRA_in(x))) W_out +
LoRA_out(act(...)). Attention is not adapted. B starts at zero, so the unit starts as the
router stage's; executed tokens pay the adapters' MACs (unmerged).

Parameters keep the dense units' names: `wi`, `wo` (RoutedFFN, like DenseFFN) and `query`,
`key`, `value`, `out` (RoutedAttention, like MultiHeadAttention), so a dense checkpoint loads
into them, beside `router/...` and (informed) `forecaster/...`.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

import pallas_kernels
from layers.attention import causal_mask, dot_product_attention
from layers.forecaster import FeatureForecaster, distillation_loss
from layers.lora import LoRA
from layers.mlp import activation_fn, feed_forward, ffn_macs
from layers.rope import apply_rope
from layers.selection import capacity_tokens, flat_indices, select_top_k, straight_through_zero

MODES = ("informed", "greedy")
COMPUTES = ("masked", "gather")
IMPORTANCE, ERROR = 0, 1


def executed_tokens(sparsity: float, length: int) -> int:
  """k, the tokens of a length-`length` sequence that execute: ceil((1 - sparsity) * length)."""
  if not 0.0 <= sparsity <= 1.0:
    raise ValueError(f"Routing sparsity={sparsity} is outside [0, 1]; it is the fraction of "
                     f"tokens that do not execute the unit (0 = dense). Fix the SPARSITY macro "
                     f"or routed_ffn.sparsity / routed_attention.sparsity.")
  return capacity_tokens(1.0 - sparsity, length)


class TokenRouter(nn.Module):
  """Router logits (float32 [..., outputs]): d -> hidden -> ReLU -> outputs."""
  hidden: int
  outputs: int
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda features, axes, name: nn.Dense(
        features, dtype=jnp.float32, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))
    h = jax.nn.relu(dense(self.hidden, ("embed", None), "hidden")(x.astype(jnp.float32)))
    return dense(self.outputs, (None, None), "logits")(h)

  def macs(self, d_model: int) -> int:
    return d_model * self.hidden + self.hidden * self.outputs


class _Routed(nn.Module):
  """What RoutedFFN and RoutedAttention share: decisions, combination, losses, MACs."""

  def _check_routing(self, x):
    if self.mode not in MODES:
      raise ValueError(f"Routing mode={self.mode!r}; choose one of {MODES}.")
    if self.compute not in COMPUTES:
      raise ValueError(f"Routing compute={self.compute!r}; choose one of {COMPUTES}.")
    if x.ndim != 3:
      raise ValueError(f"A routed unit needs x [batch, length, d_model]; got {x.shape}.")

  def _parts(self, d_model: int):
    rank = self.forecaster_rank or max(1, d_model // 8)
    hidden = self.router_hidden or max(1, d_model // 4)
    forecaster = (FeatureForecaster(rank, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="forecaster") if self.mode == "informed" else None)
    router = TokenRouter(hidden, 2 if self.mode == "informed" else 1,
                         param_dtype=self.param_dtype, name="router")
    return forecaster, router

  def _decide(self, x, router, forecaster, k: int, routes):
    """(executed bool [b, t], exec_idx, rest_idx, logits or None)."""
    b, t, _ = x.shape
    if self.is_initializing():
      router(x)
      if forecaster is not None:
        forecaster(x)
    if routes is not None:
      if self.compute != "masked":
        raise ValueError("Imposed routes need compute='masked' (the gather path's capacity is "
                         "fixed by the sparsity).")
      executed = jnp.asarray(routes) > 0
      return executed, None, None, None
    if k == t:
      idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      return jnp.ones((b, t), bool), idx, idx[:, :0], None
    logits = router(x)
    score = logits[..., IMPORTANCE]
    if self.mode == "informed":
      # The recoverability head learns only from its regression target, not from the ranking.
      score = score + jax.lax.stop_gradient(logits[..., ERROR])
    executed, exec_idx, rest_idx = select_top_k(score, k)
    return executed, exec_idx, rest_idx, logits

  def _straight(self, logits, dtype):
    """s - stop_gradient(s), s = sigmoid(importance): zero in value, [b, t, 1]."""
    s = jax.nn.sigmoid(logits[..., IMPORTANCE])
    return straight_through_zero(s)[..., None].astype(dtype)

  def _gather_straight(self, u, logits, exec_idx, forecaster, xs):
    """The gather path's u + (s - sg(s)) (u - u_hat) on the executed tokens, u [b * k, d] or
    [b, k, d], xs their inputs: the masked path's term restricted to them."""
    st = jnp.take_along_axis(self._straight(logits, u.dtype)[..., 0], exec_idx, axis=1)
    st = st.reshape(u.shape[:-1] + (1,))
    # u_hat of the executed tokens, so the router sees the gain of executing over forecasting,
    # as in the masked path (u alone would be greedy's term).
    f = jnp.zeros_like(u) if forecaster is None else forecaster(xs).astype(u.dtype)
    return u + st * (u - f)

  def _masked_combine(self, u, f, executed, logits):
    """y = where(executed, u, f) + straight-through * (u - f); f is None in greedy mode."""
    base = jnp.zeros_like(u) if f is None else f
    y = jnp.where(executed[..., None], u, base)
    if logits is not None:
      # Zero in value (the hard decision stands); its gradient tells the importance logit how
      # much the loss gains from executing the token instead of approximating (or skipping) it.
      y = y + self._straight(logits, u.dtype) * (u - base)
    return y

  def _losses(self, u, f, logits):
    if f is not None and self.distill_weight:
      self.sow("losses", "forecast_distill",
               self.distill_weight * distillation_loss(jax.lax.stop_gradient(u), f))
    if f is not None and logits is not None and self.recoverability_weight:
      err = jnp.mean(jnp.square(u.astype(jnp.float32) - f.astype(jnp.float32)), axis=-1)
      target = jax.lax.stop_gradient(jnp.log(err + 1e-6))
      self.sow("losses", "routing_recoverability", self.recoverability_weight *
               jnp.mean(jnp.square(logits[..., ERROR] - target)))

  def _sow(self, executed, unit_macs, forecaster, router, logits, d_model):
    other = float(forecaster.macs(d_model)) if forecaster is not None else 0.0
    macs = jnp.where(executed, unit_macs, other)
    if logits is not None:
      macs = macs + float(router.macs(d_model))
    self.sow("intermediates", "executed", executed.astype(jnp.int32))
    self.sow("intermediates", "macs", macs.astype(jnp.float32))

  def _forecast_rest(self, flat, rest_idx, t, forecaster, out):
    """Informed gather path: u_hat on the non-executed tokens only, written into out."""
    if forecaster is None or rest_idx.shape[1] == 0:
      return out
    rows = flat_indices(rest_idx, t)
    f = forecaster(jnp.take(flat, rows, axis=0))
    return pallas_kernels.scatter(f.astype(out.dtype), rows, out, mode="set", impl=self.impl)


class RoutedFFN(_Routed):
  """The FFN, executed for the top-k tokens, forecast (informed) or skipped (greedy) for the rest.

  Plugs into `DecoderConfig.ffn_cls` (see adacomp/methods/informed_routing/factories.py and the
  module docstring).

  Attributes:
    d_ff: hidden width of the FFN (the model's).
    activation: a `layers.mlp` activation name.
    sparsity: fraction of each sequence's tokens that do not execute (0 = dense).
    mode: "informed" (forecast the rest) or "greedy" (skip the rest: Mixture-of-Depths).
    compute: "masked" (training) or "gather" (inference with real savings).
    forecaster_rank: r of the forecaster; None means d_model // 8.
    router_hidden: hidden width of the router; None means d_model // 4.
    distill_weight: weight of the forecaster's distillation loss (0: not sown).
    recoverability_weight: weight of the recoverability head's regression loss (informed).
    lora_rank: None, or the rank of LoRA adapters on both FFN matrices (the LoRA stage).
    impl: kernel implementation of the pallas_kernels ops (None: the process default).
  """
  d_ff: int
  activation: str = "gelu"
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  sparsity: float = 0.5
  mode: str = "informed"
  compute: str = "masked"
  forecaster_rank: Optional[int] = None
  router_hidden: Optional[int] = None
  distill_weight: float = 0.0
  recoverability_weight: float = 1.0
  lora_rank: Optional[int] = None
  impl: Optional[str] = None

  def _loras(self, d_model: int):
    if self.lora_rank is None:
      return None
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return (LoRA(self.lora_rank, self.d_ff, name="lora_wi", **kw),
            LoRA(self.lora_rank, d_model, name="lora_wo", **kw))

  def _unit(self, x, w_in, w_out, loras, pre=None):
    """The FFN on x [..., d] (with its LoRA adapters); `pre` = x W_in when already computed."""
    pre = jnp.einsum("...d,df->...f", x, w_in) if pre is None else pre
    if loras is None:
      h = activation_fn(self.activation)(pre)
      return jnp.einsum("...f,fd->...d", h, w_out)
    h = activation_fn(self.activation)(pre + loras[0](x))
    return jnp.einsum("...f,fd->...d", h, w_out) + loras[1](h)

  @nn.compact
  def __call__(self, x, routes=None):
    """x: [b, t, d] (normed); routes: optional int [b, t], nonzero = execute. Returns [b, t, d]."""
    self._check_routing(x)
    b, t, d_model = x.shape
    k = executed_tokens(self.sparsity, t)
    w_in = self.param("wi", nn.with_logical_partitioning(self.kernel_init, ("embed", "mlp")),
                      (d_model, self.d_ff), self.param_dtype).astype(self.dtype)
    w_out = self.param("wo", nn.with_logical_partitioning(self.kernel_init, ("mlp", "embed")),
                       (self.d_ff, d_model), self.param_dtype).astype(self.dtype)
    forecaster, router = self._parts(d_model)
    loras = self._loras(d_model)
    executed, exec_idx, rest_idx, logits = self._decide(x, router, forecaster, k, routes)

    if self.compute == "masked" or (k == t and routes is None and not self.distill_weight):
      u = (feed_forward(x, w_in, w_out, self.activation) if loras is None else
           self._unit(x, w_in, w_out, loras))
      f = forecaster(x) if forecaster is not None else None
      self._losses(u, f, logits)
      y = u if (k == t and routes is None) else self._masked_combine(u, f, executed, logits)
    else:
      y = self._gather(x, w_in, w_out, exec_idx, rest_idx, logits, forecaster, loras)
    unit_macs = ffn_macs(d_model, self.d_ff)
    if loras is not None:
      unit_macs += loras[0].macs(d_model) + loras[1].macs(self.d_ff)
    self._sow(executed, float(unit_macs), forecaster, router, logits, d_model)
    return y

  def _gather(self, x, w_in, w_out, exec_idx, rest_idx, logits, forecaster, loras):
    b, t, d_model = x.shape
    flat = x.reshape(b * t, d_model)
    out = jnp.zeros_like(flat)
    if exec_idx.shape[1]:
      rows = flat_indices(exec_idx, t)
      xs = jnp.take(flat, rows, axis=0)
      u = self._unit(xs, w_in, w_out, loras,
                     pre=pallas_kernels.gather_matmul(flat, rows, w_in, impl=self.impl))
      if logits is not None:
        u = self._gather_straight(u, logits, exec_idx, forecaster, xs)
      out = pallas_kernels.scatter(u.astype(out.dtype), rows, out, mode="set", impl=self.impl)
    out = self._forecast_rest(flat, rest_idx, t, forecaster, out)
    return out.reshape(b, t, d_model)


class RoutedAttention(_Routed):
  """Self-attention executed for the top-k tokens (which alone are keys and values), forecast
  (informed) or skipped (greedy) for the rest. Plugs into `DecoderConfig.attention_cls`.

  Attributes: num_heads, head_dim, rope_base, rope_fraction as MultiHeadAttention; the routing
  attributes as RoutedFFN.
  """
  num_heads: int
  head_dim: int
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  sparsity: float = 0.5
  mode: str = "informed"
  compute: str = "masked"
  forecaster_rank: Optional[int] = None
  router_hidden: Optional[int] = None
  distill_weight: float = 0.0
  recoverability_weight: float = 1.0
  impl: Optional[str] = None

  def _attend(self, x, q_pos, weights, mask):
    wq, wk, wv, wo = weights
    rope = dict(base=self.rope_base, fraction=self.rope_fraction)
    q = apply_rope(jnp.einsum("btd,dhk->bthk", x, wq), q_pos, **rope)
    k = apply_rope(jnp.einsum("btd,dhk->bthk", x, wk), q_pos, **rope)
    v = jnp.einsum("btd,dhk->bthk", x, wv)
    out = dot_product_attention(q, k, v, mask, self.dtype)
    return jnp.einsum("bthk,hkd->btd", out, wo)

  @nn.compact
  def __call__(self, x, positions, *, decode: bool = False, routes=None):
    """x: [b, t, d] (normed); positions: [b, t]. Returns the attention's update [b, t, d]."""
    self._check_routing(x)
    if decode:
      raise ValueError("RoutedAttention has no KV cache (top-k routing over a sequence is not "
                       "causal); decode with attention_cls=MultiHeadAttention, or evaluate "
                       "teacher-forced.")
    b, t, d_model = x.shape
    h, hd = self.num_heads, self.head_dim
    k = executed_tokens(self.sparsity, t)

    def weight(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(self.kernel_init, axes),
                        shape, self.param_dtype).astype(self.dtype)

    weights = (weight("query", (d_model, h, hd), ("embed", "heads", "kv")),
               weight("key", (d_model, h, hd), ("embed", "heads", "kv")),
               weight("value", (d_model, h, hd), ("embed", "heads", "kv")),
               weight("out", (h, hd, d_model), ("heads", "kv", "embed")))
    forecaster, router = self._parts(d_model)
    executed, exec_idx, rest_idx, logits = self._decide(x, router, forecaster, k, routes)

    causal = causal_mask(positions, positions)
    if self.compute == "masked" or (k == t and routes is None and not self.distill_weight):
      # Keys: the executed tokens, and a query's own token (its would-be output if executed).
      own = jnp.eye(t, dtype=bool)[None, None]
      mask = causal & (executed[:, None, None, :] | own)
      u = self._attend(x, positions, weights, mask)
      f = forecaster(x) if forecaster is not None else None
      self._losses(u, f, logits)
      y = u if (k == t and routes is None) else self._masked_combine(u, f, executed, logits)
    else:
      y = self._gather(x, positions, weights, exec_idx, rest_idx, logits, forecaster)
    # Executed token: projections plus scores and weighted sum over the executed keys it sees.
    visible = jnp.sum(causal[:, 0] & executed[:, None, :], axis=-1).astype(jnp.float32)
    inner = h * hd
    unit_macs = 4 * d_model * inner + 2 * inner * visible
    self._sow(executed, unit_macs, forecaster, router, logits, d_model)
    return y

  def _gather(self, x, positions, weights, exec_idx, rest_idx, logits, forecaster):
    b, t, d_model = x.shape
    flat = x.reshape(b * t, d_model)
    out = jnp.zeros_like(flat)
    if exec_idx.shape[1]:
      xs = jnp.take_along_axis(x, exec_idx[..., None], axis=1)
      ps = jnp.take_along_axis(positions, exec_idx, axis=1)
      u = self._attend(xs, ps, weights, causal_mask(ps, ps))
      if logits is not None:
        u = self._gather_straight(u, logits, exec_idx, forecaster, xs)
      out = pallas_kernels.scatter(u.reshape(-1, d_model).astype(out.dtype),
                                   flat_indices(exec_idx, t), out, mode="set", impl=self.impl)
    out = self._forecast_rest(flat, rest_idx, t, forecaster, out)
    return out.reshape(b, t, d_model)
