"""Duo-LLM FFN: per token, skip the layer, run a small FFN, or run the big one.

Duo-LLM (Alizadeh et al., "Duo-LLM: A Framework for Studying Adaptive Computation in Large
Language Models", arXiv 2410.10846) gives every FFN layer the model's big FFN and a smaller
auxiliary FFN. For a token x and its route r in {SKIP, SMALL, BIG}:

    y = FFN_big(x)    = W_out act(W_in x)               if r = BIG    (width d_ff)
    y = FFN_small(x)  = W_out_s act(W_in_s x)           if r = SMALL  (width d_ff_small)
    y = 0                                               if r = SKIP

and the block's residual adds y, so SKIP makes the FFN part of the layer the identity. Both FFNs
take the model's FFN form (`gated`, `use_bias`, set by the block from DecoderConfig.ffn_gated /
mlp_bias like `DenseFFN`'s): gated, W_out (act(W_gate x + b_gate) * (W_in x + b_in)) + b_out
(SwiGLU / GeGLU, the biases only with `use_bias`), so a pretrained Llama's or GPT-2's FFN is the
big one.

Routes come, in order of precedence, from
  * `routes` passed in (int [b, t]): imposed from outside (oracles, ablations), honoured exactly;
  * `mode`: "random" (the paper's first stage, which makes every routing pattern a valid model:
    i.i.d. per token with probabilities `mix`), "router" (a learned per-layer router), or
    "big" / "small" / "skip" (every token one route).

Choices the paper leaves open, made here (each one an attribute, so a gin parameter):
  * Random routes are drawn from the `routing` rng stream when the caller gives one (training;
    `nn.scan` splits it per layer), i.i.d. per token (or `mix_exact`, below); otherwise
    (evaluation) each token's route is drawn from fold_in(fold_in(jax.random.key(seed), layer),
    position), with the block's index (`layer`, scanned with the blocks) and the token's
    position passed in by the block: deterministic, its own pattern per layer, the same in
    every row of a batch (a row's routes never depend on the others), and a KV-cache decoding
    step draws exactly the full forward pass's route for its position.
  * Router: logits = W_r x (+ b_r), a linear map d -> 3 from the FFN's input (the normed hidden
    state), or d -> router_hidden -> ReLU -> 3 when `router_hidden` is set (the SkipGPT form).
    It runs in float32, because a routing decision should not flip with bf16 rounding.
    Inference (no `routing` rng): r = argmax(logits). Training (a `routing` rng): straight-through
    hard Gumbel-softmax, s = softmax((logits + g) / temperature), g ~ Gumbel(0, 1),
    r = argmax(s); the forward pass uses the hard route, and the router's gradient flows
    through y + sum_m (s_m - stop_gradient(s_m)) FFN_m(x) over the modules computed for the
    token (both in "masked", the taken one in "gather" / "sorted"), zero in value.
  * Budget loss, sown into the `losses` collection (the training step adds it to the loss):
        L_budget = budget_weight * sum_m (mean_tokens softmax(logits)_m - budget_m)^2.
    By the Gumbel-max trick softmax(logits)_m is exactly the probability that a training
    token takes route m, so the loss steers the expected route fractions to `budget`.
  * `train_router_only` stops gradients into the four FFN matrices (stage 3: routers on a
    frozen random-route model); freezing the rest of the model is the optimizer's job.
  * Router parameters exist in every mode, so one checkpoint serves every stage (random-route
    training, then router training) without changing the parameter tree.

Compute paths (`compute`):
  * "masked": both FFNs on every token, the output selected by route. Training, as in the paper.
  * "gather": inference with real savings on any backend. Each module has a static capacity
    per sequence row, a fraction of the row's t tokens (`capacity=(c_small, c_big)`, ceil(c * t)
    slots per row; None: every token fits), so a row's routes and output never depend on the
    other rows of the batch. Within a row, the tokens routed to a module are ranked by
    priority, earliest position first, not by router score: top-k by score would make a
    token's route depend on tokens at later positions, which autoregressive decoding cannot
    see. The first `capacity` of them are gathered (`pallas_kernels.gather_matmul`), run
    through that FFN only and scattered back (`pallas_kernels.scatter`). Overflow rule: BIG is
    filled first; a big-routed token beyond BIG's capacity falls back to SMALL, after every
    small-routed token of its row (which keep priority) if SMALL still has room; a token
    beyond SMALL's capacity is skipped. The layer reports the routes taken after overflow.
  * "sorted": no capacity, no overflow, the masked path's function (training and inference).
    On TPU / GPU, tokens are sorted by route and both modules run by
    `pallas_kernels.routed_ffn` at their own widths, skip rows last, then unsorted
    (`routed_ffn.ffn_by_route`, per shard under a device mesh): forward and backward cost the
    routed FLOPs. XLA has no grouped matmul that saves (routed_ffn's
    reference masks), so under impl "xla" (and "auto" on CPU) the path runs, when the counts
    per row are static (`mix_exact` training routes), each row sorted small / big / skip and
    each FFN on a static slice of its n_small / n_big tokens (the routed FLOPs again), and
    otherwise (router, imposed or i.i.d. routes; a KV-cache decoding step's b rows)
    `ragged_ffn`: tokens sorted by route, each FFN once over a bucket of its own tokens
    (`lax.switch` over multiples of about m / 16 rows), so the forward pass does the routed
    work plus under one step of padding per module (under m / 8 rows for m >= 128, half a step
    on average); its backward is the
    masked path's (`cost_analysis` counts a switch's costliest branch, the bucket of every
    row, so it does not show this saving; wall time does). routed_ffn's kernels take plain
    FFNs only: a gated or biased Duo runs these XLA paths on every platform.

Random routes with `mix_exact` (stage-1 training): with a `routing` rng, each row gets exactly
round(p_small * t) small and round(p_big * t) big tokens at uniformly random positions, instead
of i.i.d. draws: every token's marginal route probability is still the mix (up to rounding),
and the static per-row counts let XLA compute only the routed tokens. Evaluation draws (no
rng) stay the per-position draws above, so a token's route does not depend on the row's length.

Sown intermediates: `routes` (int32 [b, t], the routes taken) and `macs` (float32 [b, t]):
ffn_macs(d, d_ff) for BIG, ffn_macs(d, d_ff_small) for SMALL (both 1.5x when gated, the gate's
projection, as `DenseFFN` counts it), 0 for SKIP, plus the router's
d*h + h*3 (or d*3) when the router decided. These are what the routes cost at inference; the
masked path computes both FFNs for every token (training) but reports the same numbers, and
the gather path's unused capacity slots are not charged to any token.

Parameters: the big FFN's `wi`, `wo` (and `wi_gate`, `bi`, `bi_gate`, `bo` when gated / biased),
named and shaped like `DenseFFN`'s so a dense checkpoint's FFN loads as the big FFN
(`train.init_checkpoint`); the small FFN's, the same names with `_small` (`wi_small`,
`wi_gate_small`, `bo_small`, ...); and `router/...`; float32 with logical axis names.
"""
import functools
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

import pallas_kernels
from layers.mlp import activation_fn, ffn_macs
from layers.selection import (bucketed, capacity_tokens, first_by_priority,
                             straight_through_zero)
from pallas_kernels import _dispatch
from pallas_kernels.routed_ffn import ffn_by_route
from pallas_kernels.routed_ffn.routing import permute_rows

SKIP, SMALL, BIG = 0, 1, 2
NUM_ROUTES = 3
MODES = ("random", "router", "big", "small", "skip")
COMPUTES = ("masked", "gather", "sorted")


class DuoRouter(nn.Module):
  """Route logits (float32 [..., 3]) from the hidden state: linear, or one ReLU hidden layer."""
  hidden: Optional[int] = None
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = x.astype(jnp.float32)
    dense = lambda features, axes, name: nn.Dense(
        features, dtype=jnp.float32, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))
    if self.hidden is not None:
      h = jax.nn.relu(dense(self.hidden, ("embed", None), "hidden")(h))
    return dense(NUM_ROUTES, ("embed" if self.hidden is None else None, None), "logits")(h)

  def macs(self, d_model: int) -> int:
    if self.hidden is None:
      return d_model * NUM_ROUTES
    return d_model * self.hidden + self.hidden * NUM_ROUTES


def gather_routes(routes: jax.Array, capacity: Optional[Tuple[float, float]]):
  """The overflow rule of the gather path, on routes int [b, t], row by row.

  Each sequence row has its own slots per module, capacity_tokens(c, t) = ceil(c * t), so a
  row's routes never depend on the other rows of the batch. Returns (taken routes int32 [b, t],
  (idx_small, valid_small), (idx_big, valid_big)) with indices [b * k] into the b*t tokens
  flattened batch-major, row by row.
  """
  b, t = routes.shape
  c_small, c_big = (None, None) if capacity is None else capacity
  k_small, k_big = capacity_tokens(c_small, t), capacity_tokens(c_big, t)
  # Priority by position, earliest first, not by router score: a score ranking would let later
  # tokens change an earlier token's route, which a decoder generating left to right cannot see.
  first = t - jnp.arange(t, dtype=jnp.int32)

  def one_row(row):
    idx_big, valid_big, taken_big = first_by_priority(jnp.where(row == BIG, first, 0), k_big)
    overflow = (row == BIG) & ~taken_big
    # Small-routed tokens outrank every demoted big token: demoted ones only fill spare room.
    idx_small, valid_small, taken_small = first_by_priority(
        jnp.where(row == SMALL, t + first, jnp.where(overflow, first, 0)), k_small)
    taken = jnp.where(taken_big, BIG, jnp.where(taken_small, SMALL, SKIP))
    return taken.astype(jnp.int32), (idx_small, valid_small), (idx_big, valid_big)

  taken, *slots = jax.vmap(one_row)(routes.astype(jnp.int32))
  offsets = (jnp.arange(b, dtype=jnp.int32) * t)[:, None]
  slots = [((idx + offsets).reshape(-1), valid.reshape(-1)) for idx, valid in slots]
  return taken, *slots


def exact_mix_routes(key: jax.Array, shape: Tuple[int, int], mix: Sequence[float]):
  """Routes int32 [b, t] with exactly exact_mix_counts(mix, t) small and big tokens per row, at
  uniformly random positions (independent rows): each token's marginal is round(p * t) / t."""
  n_small, n_big = exact_mix_counts(mix, shape[1])
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, shape), axis=-1), axis=-1)
  return jnp.where(rank < n_big, BIG, jnp.where(rank < n_big + n_small, SMALL, SKIP)).astype(
      jnp.int32)


def exact_mix_counts(mix: Sequence[float], t: int) -> Tuple[int, int]:
  """(n_small, n_big) tokens per row of length t under `mix_exact`: round(p * t) each."""
  total = sum(mix)
  n_big = round(mix[BIG] / total * t)
  n_small = min(round(mix[SMALL] / total * t), t - n_big)
  return n_small, n_big


def ffn_apply(x, p, activation: str, project_in=None):
  """`DenseFFN`'s function of x [..., d] with its parameter names: p holds `wi`, `wo` and, when
  the FFN has them, `wi_gate` (gated: W_out (act(W_gate x + b_gate) * (W_in x + b_in))) and the
  biases `bi`, `bi_gate`, `bo`. project_in(w) computes x @ w (default: the einsum; the gather
  path passes its gathered matmul, then x is only used for its rank)."""
  if project_in is None:
    project_in = lambda w: jnp.einsum("...d,df->...f", x, w)

  def project(suffix):
    h = project_in(p["wi" + suffix])
    return h + p["bi" + suffix] if "bi" + suffix in p else h

  gated = "wi_gate" in p
  h = activation_fn(activation)(project("_gate" if gated else ""))
  if gated:
    h = h * project("")
  if h.ndim == 3:
    h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
  y = jnp.einsum("...f,fd->...d", h, p["wo"])
  return y + p["bo"] if "bo" in p else y


def _plain(p) -> bool:
  """Whether the FFN p is plain, W_out act(W_in x): no gate, no biases."""
  return set(p) == {"wi", "wo"}


def _two_ffns_masked(x, routes, small, big, activation):
  """Both FFNs on every row of x [m, d], selected by routes [m] (the masked path, flat)."""
  y_small = ffn_apply(x, small, activation)
  y_big = ffn_apply(x, big, activation)
  r = routes[:, None]
  return jnp.where(r == BIG, y_big, jnp.where(r == SMALL, y_small, jnp.zeros_like(y_big)))


def ragged_chunk(m: int) -> int:
  """The bucket step of `ragged_ffn` for m rows: the power of two in [8, 256] at or above
  m / 16 (64 at m = 1024), so a module pads fewer than that many rows and its switch has at
  most 17 branches up to m = 4096. Each branch compiles an FFN: `bucket_sizes` (about 40 at
  m = 1024) compiled 9-18x slower than a loop, and steps of m / 8 padded the big module's
  ~512 rows of a 1024-row layer to 640 about half the time (Duo sorted inference at d_model
  1024: 0.816 of dense's time against 0.787 with m / 16, benchmarks/README.md)."""
  return max(8, min(256, 1 << max(-(-m // 16) - 1, 0).bit_length()))


def ragged_ffn(x, routes, small, big, activation: str):
  """Each row of x [m, d] through the FFN of its route (routes [m]; SKIP rows give 0; small and
  big: `ffn_apply` parameter dicts), in XLA with static shapes: rows sorted small / big / skip,
  then each module runs once over a bucket of rows from its first one (`selection.bucketed`:
  the module's row count rounded up to a multiple of `ragged_chunk(m)`, about m / 16), the
  padded rows masked out. One matmul pair per module at about its own row count:
  the skipped and other-module rows cost nothing. The backward pass is the masked path's
  (differentiating through the switch would carry every bucket's residuals, zero-filled, into
  the backward pass; a bucketed backward is not written)."""
  m = x.shape[0]
  chunk = ragged_chunk(m)
  sizes = sorted({0, m} | set(range(chunk, m, chunk)))  # at most 17 branches up to m = 4096

  def forward(x, routes, small, big):
    order = jnp.argsort(jnp.where(routes == SKIP, NUM_ROUTES, routes), stable=True)
    rows = x[order]
    out = jnp.zeros_like(rows)
    start = jnp.zeros((), jnp.int32)
    for route, weights in ((SMALL, small), (BIG, big)):
      count = jnp.sum(routes == route).astype(jnp.int32)

      def module(slots, out=out, start=start, count=count, weights=weights):
        if slots == 0:
          return out
        first = jnp.minimum(start, m - slots)  # the bucket stays inside the rows
        y = ffn_apply(jax.lax.dynamic_slice_in_dim(rows, first, slots), weights, activation)
        position = first + jnp.arange(slots)
        keep = ((position >= start) & (position < start + count))[:, None]
        old = jax.lax.dynamic_slice_in_dim(out, first, slots)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep, y.astype(out.dtype),
                                                                  old), first, 0)

      out = bucketed(count, m, module, sizes)
      start = start + count
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(m, dtype=order.dtype))
    return out[inverse]

  @jax.custom_vjp
  def ffn(x, routes, small, big):
    return forward(x, routes, small, big)

  def ffn_fwd(x, routes, small, big):
    return forward(x, routes, small, big), (x, routes, small, big)

  def ffn_bwd(res, g):
    x, routes, small, big = res
    _, vjp = jax.vjp(lambda x, small, big: _two_ffns_masked(x, routes, small, big, activation),
                     x, small, big)
    dx, d_small, d_big = vjp(g)
    return dx, None, d_small, d_big

  ffn.defvjp(ffn_fwd, ffn_bwd)
  return ffn(x, routes, small, big)


class DuoFFN(nn.Module):
  """Duo-LLM's big / small / skip FFN layer (see the module docstring).

  Attributes:
    d_ff: hidden width of the big FFN (the model's FFN).
    activation: a `layers.mlp` activation name.
    d_ff_small: hidden width of the small FFN; None means d_ff // 4.
    mode: how routes are decided when none are imposed: one of MODES.
    compute: "masked" (both FFNs), "gather" (inference, capacity) or "sorted" (training and
      inference, no capacity).
    mix: (p_skip, p_small, p_big) of random mode.
    seed: key of random mode's routes when the caller gives no `routing` rng.
    router_hidden: None for a linear router, else the width of its ReLU hidden layer.
    temperature: Gumbel-softmax temperature of router training.
    budget: (f_skip, f_small, f_big) target mean route probabilities of router mode.
    budget_weight: weight of the budget loss.
    train_router_only: stop gradients into the FFN weights.
    gated: both FFNs gated, W_out (act(W_gate x) * W_in x) (SwiGLU / GeGLU), as `DenseFFN`'s.
    use_bias: both FFNs with biases on their projections, as `DenseFFN`'s.
    capacity: (c_small, c_big) fractions of each sequence row's t tokens each module can take
      in the gather path (ceil(c * t) slots per row); None: every token fits.
    mix_exact: random mode draws exactly round(p * t) tokens of each route per row, in a
      uniformly random arrangement, instead of i.i.d. per token (see the module docstring).
    impl: kernel implementation of the pallas_kernels ops (None: the process default).
  """
  d_ff: int
  activation: str = "gelu"
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  d_ff_small: Optional[int] = None
  mode: str = "random"
  compute: str = "masked"
  mix: Tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
  seed: int = 0
  router_hidden: Optional[int] = None
  temperature: float = 1.0
  budget: Tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
  budget_weight: float = 1.0
  train_router_only: bool = False
  capacity: Optional[Tuple[float, float]] = None
  mix_exact: bool = False
  impl: Optional[str] = None
  gated: bool = False
  use_bias: bool = False

  # DecoderBlock passes its layer index and the token positions to FFNs that declare these
  # (not dataclass fields).
  takes_layer = True
  takes_positions = True

  def _check(self, x):
    if self.mode not in MODES:
      raise ValueError(f"DuoFFN.mode={self.mode!r}; choose one of {MODES}.")
    if self.compute not in COMPUTES:
      raise ValueError(f"DuoFFN.compute={self.compute!r}; choose one of {COMPUTES}.")
    if x.ndim != 3:
      raise ValueError(f"DuoFFN needs x [batch, length, d_model]; got {x.shape}.")

  def _weights(self, d_model: int, width: int, suffix: str):
    """One FFN's parameters as an `ffn_apply` dict, named like `DenseFFN`'s plus `suffix`."""
    init, zeros = self.kernel_init, nn.initializers.zeros_init()
    shapes = {"wi": ((d_model, width), ("embed", "mlp"), init),
              "wo": ((width, d_model), ("mlp", "embed"), init)}
    if self.gated:
      shapes["wi_gate"] = ((d_model, width), ("embed", "mlp"), init)
    if self.use_bias:
      shapes["bi"] = ((width,), ("mlp",), zeros)
      shapes["bo"] = ((d_model,), ("embed",), zeros)
      if self.gated:
        shapes["bi_gate"] = ((width,), ("mlp",), zeros)
    p = {}
    for name, (shape, axes, initializer) in shapes.items():
      w = self.param(name + suffix, nn.with_logical_partitioning(initializer, axes), shape,
                     self.param_dtype)
      p[name] = (jax.lax.stop_gradient(w) if self.train_router_only else w).astype(self.dtype)
    return p

  def _decide(self, shape, logits, layer, positions):
    """Routes int32 [b, t] and the straight-through term (zero-valued, [b, t, 3]) or None."""
    if self.mode == "router":
      if not self.has_rng("routing"):
        return jnp.argmax(logits, -1).astype(jnp.int32), None
      # Gumbel-max: argmax(logits + g) is a sample of softmax(logits), so training routes follow
      # the router's own distribution; the softened sample carries the gradient.
      noise = jax.random.gumbel(self.make_rng("routing"), logits.shape, jnp.float32)
      soft = jax.nn.softmax((logits + noise) / self.temperature, axis=-1)
      return jnp.argmax(soft, -1).astype(jnp.int32), straight_through_zero(soft)
    if self.mode == "random":
      mix = jnp.asarray(self.mix, jnp.float32)
      log_mix = jnp.log(mix / jnp.sum(mix))
      if not self.has_rng("routing"):
        # Evaluation: a function of (seed, layer, position) only, so every layer draws its own
        # pattern, a row's routes do not depend on the batch, and a KV-cache decoding step
        # draws the full pass's route for its position.
        base = jax.random.fold_in(jax.random.key(self.seed), layer)
        draw = lambda p: jax.random.categorical(jax.random.fold_in(base, p), log_mix)
        return jax.vmap(jax.vmap(draw))(positions).astype(jnp.int32), None
      key = self.make_rng("routing")
      if self.mix_exact:
        return exact_mix_routes(key, shape, self.mix), None
      routes = jax.random.categorical(key, log_mix, shape=shape)
      return routes.astype(jnp.int32), None
    fixed = {"skip": SKIP, "small": SMALL, "big": BIG}[self.mode]
    return jnp.full(shape, fixed, jnp.int32), None

  def _budget_loss(self, logits):
    fractions = jnp.mean(jax.nn.softmax(logits, -1).reshape(-1, NUM_ROUTES), axis=0)
    target = jnp.asarray(self.budget, jnp.float32)
    return self.budget_weight * jnp.sum(jnp.square(fractions - target))

  @nn.compact
  def __call__(self, x, routes=None, layer=0, positions=None):
    """x: [b, t, d]; routes: optional int [b, t] in {SKIP, SMALL, BIG}; layer: the block's
    index (int or traced int32), folded into random mode's seed key; positions: int [b, t]
    (default 0..t-1 in every row), folded into evaluation-time random routes' key.
    Returns y [b, t, d]."""
    self._check(x)
    b, t, d_model = x.shape
    d_small = self.d_ff // 4 if self.d_ff_small is None else self.d_ff_small
    big = self._weights(d_model, self.d_ff, "")
    small = self._weights(d_model, d_small, "_small")
    router = DuoRouter(self.router_hidden, param_dtype=self.param_dtype, name="router")
    routed_by_router = routes is None and self.mode == "router"
    logits = router(x) if routed_by_router or self.is_initializing() else None

    straight, counts = None, None
    if routes is not None:
      routes = jnp.asarray(routes, jnp.int32)
    else:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      routes, straight = self._decide((b, t), logits, layer, positions)
      if self.mode == "random" and self.mix_exact and self.has_rng("routing"):
        counts = exact_mix_counts(self.mix, t)
    if routed_by_router:
      self.sow("losses", "duo_budget", self._budget_loss(logits))

    if self.compute == "masked":
      y, taken = self._masked(x, routes, small, big, straight), routes
    elif self.compute == "gather":
      y, taken = self._gather(x, routes, small, big, straight)
    else:
      y, taken = self._sorted(x, routes, small, big, straight, counts), routes

    gate = 1.5 if self.gated else 1  # the gate's projection, as DenseFFN counts it
    macs = jnp.where(taken == BIG, float(ffn_macs(d_model, self.d_ff) * gate),
                     jnp.where(taken == SMALL, float(ffn_macs(d_model, d_small) * gate), 0.0))
    if routed_by_router:
      macs = macs + float(router.macs(d_model))
    self.sow("intermediates", "routes", taken)
    self.sow("intermediates", "macs", macs.astype(jnp.float32))
    return y

  def _masked(self, x, routes, small, big, straight):
    y_small = ffn_apply(x, small, self.activation)
    y_big = ffn_apply(x, big, self.activation)
    r = routes[..., None]
    y = jnp.where(r == BIG, y_big, jnp.where(r == SMALL, y_small, jnp.zeros_like(y_big)))
    if straight is not None:
      # Zero in value, so the forward pass is the hard route's; d loss / d s_m is then
      # <d loss / d y, FFN_m(x)>: the router learns what each module would have contributed.
      st = straight.astype(y.dtype)
      y = y + st[..., SMALL:SMALL + 1] * y_small + st[..., BIG:BIG + 1] * y_big
    return y

  def _gather(self, x, routes, small, big, straight):
    b, t, d_model = x.shape
    taken, *slots = gather_routes(routes, self.capacity)
    flat = x.reshape(b * t, d_model)
    st = None if straight is None else straight.reshape(b * t, NUM_ROUTES).astype(x.dtype)
    out = jnp.zeros_like(flat)
    for route, weights, (idx, valid) in zip((SMALL, BIG), (small, big), slots):
      if idx.shape[0] == 0:
        continue
      y = ffn_apply(flat, weights, self.activation, project_in=functools.partial(
          pallas_kernels.gather_matmul, flat, idx, impl=self.impl))
      if st is not None:
        # Only the taken module was computed here, so only its term of the masked path's
        # straight-through sum exists (zero in value, as there).
        y = y + st[idx, route][:, None] * y
      # Slots past the candidates hold other tokens; they add zero ("set" could overwrite a
      # token the other module computed).
      y = jnp.where(valid[:, None], y, 0)
      out = pallas_kernels.scatter(y, idx, out, mode="add", impl=self.impl)
    return out.reshape(b, t, d_model), taken

  def _sorted(self, x, routes, small, big, straight, counts):
    """routed_ffn's kernels on TPU / GPU. On XLA (impl 'xla', or 'auto' on CPU), where
    routed_ffn's reference would run both modules at the big width for every token: per-row
    static slices when the per-row counts are static (`counts`, from mix_exact), else
    `ragged_ffn`. All three are one function, straight-through term included. routed_ffn's
    kernels take plain FFNs only, so a gated or biased Duo runs the XLA paths on every
    platform (they compute the routed tokens only as well)."""
    kernel = lambda x, routes: self._sorted_kernel(x, routes, small, big)
    if counts is None:
      fallback = lambda x, routes: ragged_ffn(
          x.reshape(-1, x.shape[-1]), routes.reshape(-1), small, big, self.activation).reshape(
              x.shape)
    else:
      fallback = lambda x, routes: self._sorted_static(x, routes, small, big, counts)
    impl = _dispatch.resolve(self.impl)
    if impl == "xla" or not (_plain(small) and _plain(big)):
      y = fallback(x, routes)
    elif impl == "auto":
      y = jax.lax.platform_dependent(x, routes, tpu=kernel, cuda=kernel, default=fallback)
    else:
      y = kernel(x, routes)
    if straight is not None:
      # Only the taken module's term of the masked path's straight-through sum (zero in value).
      st = jnp.take_along_axis(straight, routes[..., None], -1).astype(y.dtype)
      y = y + st * y
    return y

  def _sorted_kernel(self, x, routes, small, big):
    b, t, d_model = x.shape
    w_in, w_out, widths = pallas_kernels.stack_ffn_weights(
        [(small["wi"], small["wo"]), (big["wi"], big["wo"])])
    # routed_ffn's groups: 0 = small, 1 = big; route - 1 sends SKIP to -1, the skip rows.
    y = ffn_by_route(x.reshape(b * t, d_model), routes.reshape(-1) - 1, w_in, w_out, widths,
                     activation=self.activation, impl=self.impl)
    return y.reshape(b, t, d_model)

  def _sorted_static(self, x, routes, small, big, counts):
    """Each row sorted small, big, skip; the FFNs run on static slices of n_small and n_big
    tokens per row (exact because every row has exactly these counts)."""
    b, t, d_model = x.shape
    n_small, n_big = counts
    order = jnp.argsort(jnp.where(routes == SKIP, NUM_ROUTES, routes), axis=-1, stable=True)
    order = (order + jnp.arange(b)[:, None] * t).reshape(-1).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(b * t, dtype=jnp.int32))
    rows = permute_rows(x.reshape(b * t, d_model), order, inverse).reshape(b, t, d_model)
    y = jnp.concatenate([
        ffn_apply(rows[:, :n_small], small, self.activation),
        ffn_apply(rows[:, n_small:n_small + n_big], big, self.activation),
        jnp.zeros((b, t - n_small - n_big, d_model), x.dtype)], axis=1)
    return permute_rows(y.reshape(b * t, d_model), inverse, order).reshape(b, t, d_model)
