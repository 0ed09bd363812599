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
    scores). `decision` chooses: "topk" (training, and the teacher-forced figure) or "causal"
    (inference, what a generating model does; see Causal routing below).

Causal routing (MoD's remedy, arXiv 2404.02258 section 3.5, the auxiliary-predictor variant):
  * A second small router, the causal predictor c(x) = TokenRouter(sg(x)) with one logit, is
    trained beside the router by an auxiliary binary cross-entropy toward the top-k membership
    (the target is the hard top-k decision, a stop-gradient quantity):
        L_causal = w_c * mean_i BCE(c_i, executed_i(top-k)).
    Why a separate predictor on stop_gradient(x) rather than a BCE on the router's own logits:
    the router's importance logit already carries the straight-through gradient (and, informed,
    ranks by a + e); a BCE on it would pull the ranking toward its own previous output and
    change the trained function; the separate predictor cannot change the model's function
    (its input is stop-gradient, its output only decides at inference), so the top-k model is
    unchanged whatever w_c is (up to a global-norm gradient clipping, which sees the
    predictor's gradients too).
  * Threshold: a token executes iff c_i > tau, tau the scalar parameter `causal_threshold` (so
    it is saved in the checkpoint with the rest) fitted during training by the pinball
    (quantile) loss  w_c * mean_i rho_q(sg(c_i) - tau), q = sparsity, whose minimiser is the
    q-quantile of the predictor's logits over the training tokens: calibrated to execute the
    target fraction 1 - sparsity. (Adam moves tau by ~ the learning rate per step; tau starts
    at 0, the BCE's natural boundary, which a calibrated predictor needs little change from.)
  * Sown: `losses/routing_causal` (BCE + pinball, when the router decides in "topk" mode and
    w_c > 0) and intermediates `causal_executed` (int32 [b, t]: the causal decision, beside
    `executed`, in "topk" mode): their agreement is the causal-vs-top-k rate.
  * "causal" mode decides each token from its own x_i alone, so the model is causal; there is
    no capacity, the executed count is data (sparsity 0 still executes every token, exactly
    dense). Rows never interact.
  * Compute in "causal" mode: "masked" runs the unit on every token (values), "gather" gathers
    the executed tokens into a static number of slots chosen at run time from buckets
    (`bucket_sizes`: powers of two, then multiples of 16 in steps that grow with the size,
    under 1/8 of it above 256; `lax.switch`: slots = the smallest bucket >= the executed
    count, of the flattened b * t tokens for the FFN, of the longest row for the attention)
    and runs the unit on those only; at a decoding step (t = 1, batch 1) that is a
    `lax.cond`: a token that does not execute costs the predictor (and the forecaster) only.

Compute paths (`compute`):
  * "masked": the unit and the forecaster on every token, outputs selected by the decision:
    a dense computation (every token pays the unit), the reference the gather path is tested
    against. The straight-through term and the recoverability target see u on every token.
  * "gather": training and inference with real savings (what configs/informed_routing.gin and
    configs/mod.gin train in). The k executed tokens of each sequence are gathered
    (`pallas_kernels.gather_matmul` for the FFN's first matmul; the attention runs on the
    gathered subsequence with its own positions), the unit runs on them only and the result is
    scattered back (`pallas_kernels.scatter`); informed mode forecasts the t - k others
    (gathered with an XLA gather: the forecaster is small), greedy mode leaves them at zero.
    Same values as "masked". The straight-through term is the masked path's, (s - sg(s)) *
    (u - u_hat), on the executed tokens (so the forecast also runs on those, zero in value);
    it reaches executed tokens only (as in MoD, where the router weight multiplies the executed
    tokens' output alone), where the two paths' router gradients agree (tested). The
    recoverability regression and the distillation loss are means over the executed tokens
    (the others have no u here); the masked path's are over every token (tested: each
    equals the masked formula restricted to the executed tokens). The unit's parameters get
    the same gradients in both (the straight-through term is zero in value). The gather path
    costs a per-sequence argsort besides.

Attention unit: skipped (or forecast) tokens are not keys or values for anybody, as in MoD: an
executed token attends to the executed tokens at or before its position (itself included).
(In "masked" top-k compute a non-executed token's would-be output, used only by the
straight-through term and the recoverability target, attends to those and to itself.)
KV-cache decoding (`decode=True`, "causal" mode only: a top-k over a sequence cannot be
decoded): the cache holds `cached_key`, `cached_value` and `cached_executed` (bool [b, L]) per
position; a token that does not execute writes its slot's flag False and no query ever attends
to it, so every query sees exactly the keys the full causal-mode pass lets it see: the executed
tokens at or before its position.

Sown: `losses/forecast_distill` (w_d * mean (stop_gradient(u) - u_hat)^2 over every token, when
`distill_weight` > 0: stage 1 of the informed training), `losses/routing_recoverability`
(informed, router deciding, masked compute), intermediates `executed` (int32 [b, t], 1 where
the unit ran) and `macs` (float32 [b, t]): the unit's MACs for executed tokens, the
forecaster's (informed) or nothing (greedy) for the others, plus the router's for every token
when the router decided. At sparsity 0 that is exactly the dense unit's MACs.

LoRA (RoutedFFN, `lora_rank`): the paper's optional last stage fine-tunes the frozen base with
low-rank adapters after the routers; here every FFN matrix gets one (`layers.lora`), W_in
(and W_gate) inside the activation and W_out on the hidden state: u(x) = (act(x W_in +
LoRA_in(x))) W_out + LoRA_out(act(...)); gated, act(x W_gate + LoRA_gate(x)) * (x W_in +
LoRA_in(x)) is the hidden state. Attention is not adapted. B starts at zero, so the unit starts
as the router stage's; executed tokens pay the adapters' MACs (unmerged).

Parameters keep the dense units' names: `wi`, `wo` and, in the gated / biased forms
(DecoderConfig.ffn_gated / mlp_bias: SwiGLU Llama, biased GPT-2), `wi_gate`, `bi`, `bi_gate`,
`bo` (RoutedFFN, like DenseFFN; MACs 1.5x with the gate, as DenseFFN's) and `query`,
`key`, `value`, `out` (RoutedAttention, like MultiHeadAttention), so a dense checkpoint loads
into them, beside `router/...` and (informed) `forecaster/...`.
"""
import functools
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
from layers.selection import (  # pylint: disable=unused-import (bucket_sizes: routing's API)
    bucket_sizes, bucketed, capacity_tokens, flat_indices, select_top_k, straight_through_zero)

MODES = ("informed", "greedy")
COMPUTES = ("masked", "gather")
DECISIONS = ("topk", "causal")
IMPORTANCE, ERROR = 0, 1


def executed_first(executed):
  """Per row of executed bool [b, t]: positions, the executed ones first (in order)."""
  return jnp.argsort(~executed, axis=-1, stable=True).astype(jnp.int32)


def executed_tokens(sparsity: float, length: int) -> int:
  """k, the tokens of a length-`length` sequence that execute: ceil((1 - sparsity) * length)."""
  if not 0.0 <= sparsity <= 1.0:
    raise ValueError(f"Routing sparsity={sparsity} is outside [0, 1]; it is the fraction of "
                     f"tokens that do not execute the unit (0 = dense). Fix the SPARSITY macro "
                     f"or routed_ffn.sparsity / routed_attention.sparsity.")
  return capacity_tokens(1.0 - sparsity, length)


def routed_decisions(config) -> dict:
  """{slot: decision} of the routed units (with sparsity > 0) a DecoderConfig holds."""
  out = {}
  for slot in ("ffn_cls", "attention_cls"):
    cls = getattr(config, slot)
    base = getattr(cls, "func", cls)
    if isinstance(base, type) and issubclass(base, (RoutedFFN, RoutedAttention)):
      kw = getattr(cls, "keywords", {})
      if kw.get("sparsity", base.sparsity) > 0:
        out[slot] = kw.get("decision", base.decision)
  return out


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
    if self.decision not in DECISIONS:
      raise ValueError(f"Routing decision={self.decision!r}; choose 'topk' (training, "
                       f"teacher-forced) or 'causal' (inference, generation).")
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

  def _causal_parts(self, d_model: int):
    """The causal predictor (one logit per token) and its threshold parameter."""
    hidden = self.router_hidden or max(1, d_model // 4)
    predictor = TokenRouter(hidden, 1, param_dtype=self.param_dtype, name="causal")
    threshold = self.param("causal_threshold", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ()), (), jnp.float32)
    return predictor, threshold

  def _causal_logits(self, x, predictor):
    """c(sg(x)) [b, t]: depends on each token's own input only."""
    return predictor(jax.lax.stop_gradient(x))[..., 0]

  def _causal_decide(self, x, predictor, threshold):
    """Causal-mode decisions, bool [b, t]: c_i > tau (every token at sparsity 0)."""
    if self.sparsity == 0.0:
      return jnp.ones(x.shape[:2], bool)
    return self._causal_logits(x, predictor) > threshold

  def _causal_losses(self, x, predictor, threshold, executed):
    """Topk mode: BCE of the predictor toward the top-k decision, pinball loss of the threshold
    at the sparsity quantile; sows the causal decision beside the top-k one."""
    c = self._causal_logits(x, predictor)
    self.sow("intermediates", "causal_executed", (c > threshold).astype(jnp.int32))
    if not self.causal_weight:
      return
    target = executed.astype(jnp.float32)
    bce = jnp.mean(jax.nn.softplus(c) - target * c)
    r = jax.lax.stop_gradient(c) - threshold
    q = self.sparsity
    pinball = jnp.mean(jnp.maximum(q * r, (q - 1.0) * r))
    self.sow("losses", "routing_causal", self.causal_weight * (bce + pinball))

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

  def _gather_train(self, u, xs, logits, exec_idx, forecaster):
    """The gather path's losses and straight-through on the executed tokens only, u their unit
    outputs ([b * k, d] or [b, k, d]) and xs their inputs: the forecast u_hat(xs) (when a loss
    or the straight-through needs it), the distillation and recoverability losses over the
    executed tokens (the others have no u here), and u + (s - sg(s)) (u - u_hat), the masked
    path's term restricted to them (u_hat = 0 in greedy mode)."""
    f = None
    if forecaster is not None and (logits is not None or self.distill_weight):
      # u_hat of the executed tokens, so the router sees the gain of executing over
      # forecasting, as in the masked path (u alone would be greedy's term).
      f = forecaster(xs).astype(u.dtype)
    if logits is None:
      self._losses(u, f, None)
      return u
    rows = jnp.take_along_axis(logits, exec_idx[..., None], axis=1)
    self._losses(u, f, rows.reshape(u.shape[:-1] + logits.shape[-1:]))
    st = self._straight(rows, u.dtype).reshape(u.shape[:-1] + (1,))
    return u + st * (u - (jnp.zeros_like(u) if f is None else f))

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

  def _sow(self, executed, unit_macs, forecaster, router, router_ran, d_model):
    """Every token pays `router` when it ran; executed ones the unit, others the forecaster."""
    other = float(forecaster.macs(d_model)) if forecaster is not None else 0.0
    macs = jnp.where(executed, unit_macs, other)
    if router_ran:
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
  module docstring). The unit is DenseFFN's, parameter for parameter (`wi`, `wo`; `wi_gate`
  when gated; `bi`, `bo` and `bi_gate` with biases), so a dense or imported checkpoint's FFN
  loads into it.

  Attributes:
    d_ff: hidden width of the FFN (the model's).
    activation: a `layers.mlp` activation name.
    gated: the GLU form act(x W_gate) * (x W_in) (SwiGLU / GeGLU: DecoderConfig.ffn_gated).
    use_bias: biases on the FFN's projections (GPT-2, OPT: DecoderConfig.mlp_bias).
    sparsity: fraction of each sequence's tokens that do not execute (0 = dense).
    mode: "informed" (forecast the rest) or "greedy" (skip the rest: Mixture-of-Depths).
    compute: "masked" (training) or "gather" (inference with real savings).
    decision: "topk" (per-sequence top-k: training, teacher-forced) or "causal" (each token
      by the causal predictor and its threshold: inference, generation).
    causal_weight: weight of the causal predictor's BCE and threshold losses (0: not sown).
    forecaster_rank: r of the forecaster; None means d_model // 8.
    router_hidden: hidden width of the router; None means d_model // 4.
    distill_weight: weight of the forecaster's distillation loss (0: not sown).
    recoverability_weight: weight of the recoverability head's regression loss (informed).
    lora_rank: None, or the rank of LoRA adapters on every FFN matrix (the LoRA stage).
    impl: kernel implementation of the pallas_kernels ops (None: the process default).
  """
  d_ff: int
  activation: str = "gelu"
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  gated: bool = False
  use_bias: bool = False
  sparsity: float = 0.5
  mode: str = "informed"
  compute: str = "masked"
  forecaster_rank: Optional[int] = None
  router_hidden: Optional[int] = None
  distill_weight: float = 0.0
  recoverability_weight: float = 1.0
  lora_rank: Optional[int] = None
  decision: str = "topk"
  causal_weight: float = 1.0
  impl: Optional[str] = None

  def _inputs(self):
    """The input projections' names: the activated one first (DenseFFN's names)."""
    return ("wi_gate", "wi") if self.gated else ("wi",)

  def _weights(self, d_model: int) -> dict:
    """DenseFFN's parameters by name: kernels `wi`(`_gate`), `wo`, biases `bi`(`_gate`), `bo`."""
    def param(name, shape, axes, init=self.kernel_init):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        self.param_dtype).astype(self.dtype)

    w = {}
    for name in self._inputs():
      w[name] = param(name, (d_model, self.d_ff), ("embed", "mlp"))
      if self.use_bias:
        bias = "b" + name[1:]
        w[bias] = param(bias, (self.d_ff,), ("mlp",), nn.initializers.zeros)
    w["wo"] = param("wo", (self.d_ff, d_model), ("mlp", "embed"))
    if self.use_bias:
      w["bo"] = param("bo", (d_model,), ("embed",), nn.initializers.zeros)
    return w

  def _loras(self, d_model: int):
    """{matrix name: LoRA} on every FFN matrix, or None."""
    if self.lora_rank is None:
      return None
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    loras = {name: LoRA(self.lora_rank, self.d_ff, name="lora_" + name, **kw)
             for name in self._inputs()}
    loras["wo"] = LoRA(self.lora_rank, d_model, name="lora_wo", **kw)
    return loras

  def _unit_macs(self, d_model: int, loras) -> float:
    """One executed token's MACs: the FFN's (1.5x with the gate, as DenseFFN) and adapters'."""
    macs = ffn_macs(d_model, self.d_ff) * (1.5 if self.gated else 1)
    if loras is not None:
      macs += sum(lora.macs(self.d_ff if name == "wo" else d_model)
                  for name, lora in loras.items())
    return float(macs)

  def _unit(self, x, w, loras, pre=None):
    """The FFN on x [..., d] (with its LoRA adapters: {name: callable}); `pre` = {name: x W}
    for input projections already computed (the gather path's fused gather-matmul)."""
    if not (self.gated or self.use_bias or loras or pre):
      return feed_forward(x, w["wi"], w["wo"], self.activation)  # the dense default, as before

    def project(name):
      h = pre[name] if pre else jnp.einsum("...d,df->...f", x, w[name])
      if self.use_bias:
        h = h + w["b" + name[1:]]
      return h if loras is None else h + loras[name](x)

    names = self._inputs()
    h = activation_fn(self.activation)(project(names[0]))
    if self.gated:
      h = h * project(names[1])
    y = jnp.einsum("...f,fd->...d", h, w["wo"])
    if loras is not None:
      y = y + loras["wo"](h)
    return y + w["bo"] if self.use_bias else y

  @nn.compact
  def __call__(self, x, routes=None):
    """x: [b, t, d] (normed); routes: optional int [b, t], nonzero = execute. Returns [b, t, d]."""
    self._check_routing(x)
    b, t, d_model = x.shape
    k = executed_tokens(self.sparsity, t)
    w = self._weights(d_model)
    forecaster, router = self._parts(d_model)
    predictor, threshold = self._causal_parts(d_model)
    loras = self._loras(d_model)
    unit_macs = self._unit_macs(d_model, loras)
    if self.is_initializing():
      self._causal_logits(x, predictor)
    if self.decision == "causal" and routes is None and not self.is_initializing():
      executed = self._causal_decide(x, predictor, threshold)
      y = self._causal_ffn(x, w, loras, forecaster, executed)
      self._sow(executed, unit_macs, forecaster, predictor, self.sparsity > 0, d_model)
      return y
    executed, exec_idx, rest_idx, logits = self._decide(x, router, forecaster, k, routes)
    if logits is not None:
      self._causal_losses(x, predictor, threshold, executed)

    if self.compute == "masked" or (k == t and routes is None and not self.distill_weight):
      u = self._unit(x, w, loras)
      f = forecaster(x) if forecaster is not None else None
      self._losses(u, f, logits)
      y = u if (k == t and routes is None) else self._masked_combine(u, f, executed, logits)
    else:
      y = self._gather(x, w, exec_idx, rest_idx, logits, forecaster, loras)
    self._sow(executed, unit_macs, forecaster, router, logits is not None, d_model)
    return y

  def _causal_ffn(self, x, w, loras, forecaster, executed):
    """Causal mode: u on the executed tokens, the forecast (or 0) on the others. "gather" runs
    u on a bucket of slots of the flattened tokens (rows do not interact: a slot holds one
    token, and the bucket only sets how many slots run)."""
    b, t, d_model = x.shape
    base = jnp.zeros_like(x) if forecaster is None else forecaster(x).astype(x.dtype)
    # The adapters as pure functions of their params: they run inside lax.switch branches.
    adapters = None if loras is None else {
        name: functools.partial(lora.clone(parent=None).apply,
                                {"params": self.variables["params"]["lora_" + name]})
        for name, lora in loras.items()}

    if self.compute == "masked":
      return jnp.where(executed[..., None], self._unit(x, w, adapters), base)
    flat, flat_exec = x.reshape(b * t, d_model), executed.reshape(b * t)
    flat_base = base.reshape(b * t, d_model)
    order = jnp.argsort(~flat_exec, stable=True).astype(jnp.int32)

    def branch(slots):
      if slots == 0:
        return flat_base
      rows = order[:slots]
      u = self._unit(jnp.take(flat, rows, axis=0)[None], w, adapters)[0]  # the FFN's layout
      # The bucket's padded slots hold tokens that do not execute: they keep their forecast.
      keep = 0 if forecaster is None else jnp.take(flat_base, rows, axis=0)
      u = jnp.where(jnp.take(flat_exec, rows)[:, None], u.astype(flat.dtype), keep)
      return flat_base.at[rows].set(u, unique_indices=True)

    return bucketed(jnp.sum(flat_exec), b * t, branch).reshape(b, t, d_model)

  def _gather(self, x, w, exec_idx, rest_idx, logits, forecaster, loras):
    b, t, d_model = x.shape
    flat = x.reshape(b * t, d_model)
    out = jnp.zeros_like(flat)
    if exec_idx.shape[1]:
      rows = flat_indices(exec_idx, t)
      xs = jnp.take(flat, rows, axis=0)
      pre = {name: pallas_kernels.gather_matmul(flat, rows, w[name], impl=self.impl)
             for name in self._inputs()}
      u = self._gather_train(self._unit(xs, w, loras, pre=pre), xs, logits, exec_idx,
                             forecaster)
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
  decision: str = "topk"
  causal_weight: float = 1.0
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
    """x: [b, t, d] (normed); positions: [b, t] (ignored when decoding: the cache index says).
    Returns the attention's update [b, t, d]."""
    self._check_routing(x)
    if decode and self.decision != "causal" and self.sparsity > 0:
      raise ValueError("RoutedAttention decodes only with decision='causal' (a per-sequence "
                       "top-k is not causal): bind routed_attention.decision = 'causal'.")
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
    predictor, threshold = self._causal_parts(d_model)
    if self.is_initializing():
      self._causal_logits(x, predictor)
    if decode or (self.decision == "causal" and routes is None and not self.is_initializing()):
      cached = self._decode(x, weights, forecaster, predictor, threshold) if decode else None
      if cached is None:
        executed = self._causal_decide(x, predictor, threshold)
        y = self._causal_attention(x, positions, weights, forecaster, executed)
        visible = causal_mask(positions, positions)[:, 0] & executed[:, None, :]
      else:
        y, executed, visible = cached
      unit_macs = 4 * d_model * h * hd + 2 * h * hd * jnp.sum(visible, -1).astype(jnp.float32)
      self._sow(executed, unit_macs, forecaster, predictor, self.sparsity > 0, d_model)
      return y
    executed, exec_idx, rest_idx, logits = self._decide(x, router, forecaster, k, routes)
    if logits is not None:
      self._causal_losses(x, predictor, threshold, executed)

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
    self._sow(executed, unit_macs, forecaster, router, logits is not None, d_model)
    return y

  def _base(self, x, forecaster):
    return jnp.zeros_like(x) if forecaster is None else forecaster(x).astype(x.dtype)

  def _causal_attention(self, x, positions, weights, forecaster, executed):
    """Causal mode, full sequence: an executed token attends to the executed tokens at or
    before it; the others take the forecast (or 0). "gather" runs the attention on a bucket of
    slots per row (the longest row's executed count, rounded up to a bucket)."""
    base = self._base(x, forecaster)
    if self.compute == "masked":
      mask = causal_mask(positions, positions) & executed[:, None, None, :]
      return jnp.where(executed[..., None], self._attend(x, positions, weights, mask), base)
    b, t, _ = x.shape
    order = executed_first(executed)
    rows = jnp.arange(b)[:, None]

    def branch(slots):
      if slots == 0:
        return jnp.zeros_like(x)
      idx = order[:, :slots]
      valid = jnp.take_along_axis(executed, idx, axis=1)
      ps = jnp.take_along_axis(positions, idx, axis=1)
      xs = jnp.take_along_axis(x, idx[..., None], axis=1)
      u = self._attend(xs, ps, weights, causal_mask(ps, ps) & valid[:, None, None, :])
      return jnp.zeros_like(x).at[rows, idx].set(jnp.where(valid[..., None], u, 0))

    out = bucketed(jnp.max(jnp.sum(executed, axis=1)), t, branch)
    return jnp.where(executed[..., None], out, base)

  def _decode(self, x, weights, forecaster, predictor, threshold):
    """The KV-cache call (T new tokens at the cache index; causal mode). Returns None at init
    (the caller's full pass sizes the cache), else (y, executed [b, T], visible [b, T, L]).

    Every new token writes its slot's `cached_executed` flag; only an executed token's key and
    value are read by anybody (gather compute, T = 1: only executed rows even compute and write
    them). A query sees the cache slots at or before its position whose flag is set: exactly
    the keys of the full causal-mode pass."""
    b, t, d_model = x.shape
    h, hd = self.num_heads, self.head_dim
    initialized = self.has_variable("cache", "cached_key")
    ck = self.variable("cache", "cached_key", jnp.zeros, (b, t, h, hd), self.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, (b, t, h, hd), self.dtype)
    ce = self.variable("cache", "cached_executed", jnp.zeros, (b, t), bool)
    ci = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return None
    wq, wk, wv, wo = weights
    rope = dict(base=self.rope_base, fraction=self.rope_fraction)
    executed = self._causal_decide(x, predictor, threshold)
    start = ci.value
    length = ck.value.shape[1]
    positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    flags = jax.lax.dynamic_update_slice(ce.value, executed, (0, start))
    visible = causal_mask(positions, jnp.broadcast_to(jnp.arange(length), (b, length)))
    visible = visible[:, 0] & flags[:, None, :]

    def project(xs, ps):
      q = apply_rope(jnp.einsum("btd,dhk->bthk", xs, wq), ps, **rope)
      k = apply_rope(jnp.einsum("btd,dhk->bthk", xs, wk), ps, **rope)
      return q, k, jnp.einsum("btd,dhk->bthk", xs, wv)

    def attend(q, keys, values, mask):
      out = dot_product_attention(q, keys, values, mask[:, None], self.dtype)
      return jnp.einsum("bthk,hkd->btd", out, wo)

    if self.compute == "gather" and t == 1:
      order = jnp.argsort(~executed[:, 0], stable=True).astype(jnp.int32)

      def branch(slots):
        if slots == 0:
          return jnp.zeros_like(x), ck.value, cv.value
        rows = order[:slots]
        valid = executed[rows, 0]
        q, k, v = project(x[rows], positions[rows])
        keys = jax.lax.dynamic_update_slice(ck.value[rows], k, (0, start, 0, 0))
        values = jax.lax.dynamic_update_slice(cv.value[rows], v, (0, start, 0, 0))
        u = jnp.where(valid[:, None, None], attend(q, keys, values, visible[rows]), 0)
        keep = valid[:, None, None, None]
        return (jnp.zeros_like(x).at[rows].set(u.astype(x.dtype)),
                ck.value.at[rows].set(jnp.where(keep, keys, ck.value[rows])),
                cv.value.at[rows].set(jnp.where(keep, values, cv.value[rows])))

      u, keys, values = bucketed(jnp.sum(executed), b, branch)
    else:
      q, k, v = project(x, positions)
      keys = jax.lax.dynamic_update_slice(ck.value, k, (0, start, 0, 0))
      values = jax.lax.dynamic_update_slice(cv.value, v, (0, start, 0, 0))
      u = attend(q, keys, values, visible)
    ck.value, cv.value, ce.value, ci.value = keys, values, flags, start + t
    return jnp.where(executed[..., None], u, self._base(x, forecaster)), executed, visible

  def _gather(self, x, positions, weights, exec_idx, rest_idx, logits, forecaster):
    b, t, d_model = x.shape
    flat = x.reshape(b * t, d_model)
    out = jnp.zeros_like(flat)
    if exec_idx.shape[1]:
      xs = jnp.take_along_axis(x, exec_idx[..., None], axis=1)
      ps = jnp.take_along_axis(positions, exec_idx, axis=1)
      u = self._gather_train(self._attend(xs, ps, weights, causal_mask(ps, ps)), xs, logits,
                             exec_idx, forecaster)
      out = pallas_kernels.scatter(u.reshape(-1, d_model).astype(out.dtype),
                                   flat_indices(exec_idx, t), out, mode="set", impl=self.impl)
    out = self._forecast_rest(flat, rest_idx, t, forecaster, out)
    return out.reshape(b, t, d_model)
