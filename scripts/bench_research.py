r"""Every method at research widths: time against the MAC-ratio ideal, training and inference.

  python scripts/bench_research.py                          # d_model 512 and 1024, 8 layers
  python scripts/bench_research.py --d_models=512 --methods=dense,informed,mod
  python scripts/bench_research.py --quick                  # d_model 128, 2 layers: a smoke run

For each width and each method budget it builds the method's gin config at that width
(`d_ff = 4 d_model`, heads of 64, `--num_layers`, `--seq_len`; float32; no checkpoint needed:
parameters are fresh, and routing decisions do not change any shape) and measures, against the
dense decoder of the same shape:

  train    one optimizer step of the config's training stage (its own `compute`);
  infer    one evaluation forward pass (logits and sown MACs) in the inference compute
           (`gather` for routed units and Duo, token pruning for AS-ViT). Routed units (informed,
           MoD) twice: with their teacher-forced top-k ("not causal": no generating model can
           route so) and with causal decisions ("infer causal", what eval.py and generation
           run), each fresh predictor's threshold fitted to its layer's sparsity quantile
           (calibrate_causal: each layer executes 1 - sparsity of the tokens).

Columns:
  ms        median wall time (--repeats calls after 2 warm-up calls);
  t/dense   time over the dense model's at the same width (same mode): the median of per-round
            ratios, each method's calls interleaved with the dense model's (ABBA), so the
            host's drifting speed divides out;
  MACs      the sown MACs per token over dense's: the ideal t/dense;
  ratio     (t/dense) / MACs: 1.00 means the time follows the arithmetic, the issue's bar is 1.15;
  XLA       XLA's compiled FLOPs over dense's (cost_analysis of the same step with the layers
            unrolled: XLA counts a scanned loop's body once): what the program executes;
  t/XLA     (t/dense) / XLA: how the time follows the executed FLOPs (a stage that freezes
            parameters skips their weight gradients, so its XLA is below its MACs);
  GFLOP/s   useful FLOPs (2 x MACs per token x tokens, x3 for a training step) per second;
  %peak     GFLOP/s over this machine's jitted float32 matmul peak, measured first.

Two reference rows route nothing: the dense model with d_ff / 4 and d_ff / 2 (about the FFN
MACs of the 75% and 50% routed rows), the ratio an FFN-only saving reaches on this backend
before any routing cost. A second table gives every row's CPU time (user: the arithmetic; sys:
mostly page faults), the cores it keeps busy, and its user time over dense's against its MACs:
a wall ratio above that CPU ratio is time lost to idle cores. --breakdown adds the profile:
each routed FFN alone, the in-model rest (the dense model with d_ff 8) and the floor they give,
and the rest's own profile: one layer's attention, its projections, its core and a one-matmul
control with the core's MACs, each against the dense FFN alone, and how many cores each keeps
busy (user time over wall time).

Generation tokens/s per method is `scripts/bench_generate.py`'s table. Prints Markdown and
writes the rows as JSON to --output. A benchmark, never a test.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np

VOCAB = 259  # the byte tokenizer's vocabulary

# name -> (gin files, training bindings, inference bindings)
METHODS = {
    "dense": (["configs/dense.gin"], [], []),
    "duo random 0.2/0.3/0.5 (stage 1)": (
        ["configs/duo.gin"], [], ["duo_ffn.compute = 'gather'", "duo_ffn.capacity = (0.3, 0.5)"]),
    "duo random 0.2/0.3/0.5 sorted (stage 1)": (
        ["configs/duo.gin"], ["duo_ffn.compute = 'sorted'"], ["duo_ffn.compute = 'sorted'"]),
    "duo router 0/0.75/0.25": (
        ["configs/duo_router.gin"], [],
        ["duo_ffn.compute = 'gather'", "duo_ffn.mode = 'random'", "duo_ffn.mix = (0, 0.75, 0.25)",
         "duo_ffn.capacity = (0.75, 0.25)"]),
    "informed 0.5": (["configs/informed_routing.gin"], [], ["routed_ffn.compute = 'gather'"]),
    "informed 0.75": (["configs/informed_routing.gin"], ["SPARSITY = 0.75"],
                      ["routed_ffn.compute = 'gather'", "SPARSITY = 0.75"]),
    "mod 0.5": (["configs/mod.gin"], [], ["routed_ffn.compute = 'gather'"]),
    "mod 0.75": (["configs/mod.gin"], ["SPARSITY = 0.75"],
                 ["routed_ffn.compute = 'gather'", "SPARSITY = 0.75"]),
    # Its inference saving is in generation (a teacher-forced pass under the layer mask is a
    # masked dense computation): scripts/bench_generate.py / bench_skipdecode.py.
    "skipdecode 2x": (["configs/skipdecode.gin"], [], None),
    # Parameter tokens at the paper's research-width sizing (set per width in `measure`):
    # n = d_model for the q/k/v/out projections, 4 d_model for the FFN.
    "tokenformer": (["configs/tokenformer.gin"], [], []),
    # References with no routing at all: the dense model with its FFN narrowed (d_ff set per
    # width in `method_sizes`) to about the FFN MACs of the 75% / 50% routed rows. Their ratio is
    # what an FFN-only saving reaches on this backend before any routing cost.
    "dense d_ff/4 (no routing)": (["configs/dense.gin"], [], []),
    "dense d_ff/2 (no routing)": (["configs/dense.gin"], [], []),
}
SHORT = {"dense": "dense", "duo": "duo random 0.2/0.3/0.5 (stage 1)",
         "duo_sorted": "duo random 0.2/0.3/0.5 sorted (stage 1)",
         "duo_router": "duo router 0/0.75/0.25", "informed": "informed 0.5",
         "informed75": "informed 0.75", "mod": "mod 0.5", "mod75": "mod 0.75",
         "skipdecode": "skipdecode 2x", "tokenformer": "tokenformer",
         "dense_ff4": "dense d_ff/4 (no routing)", "dense_ff2": "dense d_ff/2 (no routing)"}
NARROW = {"dense d_ff/4 (no routing)": 4, "dense d_ff/2 (no routing)": 2}


def size_bindings(d_model, num_layers, seq_len):
  return [f"DecoderConfig.d_model = {d_model}", f"DecoderConfig.d_ff = {4 * d_model}",
          f"DecoderConfig.num_heads = {max(1, d_model // 64)}", "DecoderConfig.head_dim = 64",
          f"DecoderConfig.num_layers = {num_layers}",
          f"DecoderConfig.max_len = {max(1024, seq_len)}", "DecoderConfig.dtype = 'float32'",
          "train.init_checkpoint = None", f"train.seq_len = {seq_len}",
          # SkipDecode's schedule: the prompt (warm-up) part scales with the sequence.
          f"schedule_for_speedup.warmup_len = {max(1, seq_len // 8)}"]


def _once(fn, args):
  """(wall s, user s, sys s) of one call, to its results: getrusage counts every thread of the
  process, so user is the arithmetic of XLA's threads and sys mostly the page faults of fresh
  buffers (on this VM a large and noisy part of a training step at d_model 1024)."""
  import jax  # pylint: disable=g-import-not-at-top
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  jax.block_until_ready(fn(*args))
  t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
  return t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def timed_stats(fn, args, repeats, ref=None, also=()):
  """Median wall, user and sys ms of `repeats` calls after 2 warm-up calls. With `ref` (fn,
  args) the reference runs in the same rounds, interleaved (ABBA order), and `rel` is the median
  of the per-round time ratios: a drift of the host's speed (20-30% within minutes on this VM)
  hits both sides of each ratio instead of one row of the table. `also`: more (fn, args) calls
  timed in the same rounds, their stats (the same keys) in out["also"]: rows that are compared
  with each other (a routed unit's top-k and causal twins) see the same host."""
  calls = [(fn, args)] + list(also) + ([ref] if ref else [])
  for _ in range(2):
    for f, x in calls:
      _once(f, x)
  got = [[] for _ in calls]
  for i in range(repeats):
    order = range(len(calls)) if i % 2 == 0 else reversed(range(len(calls)))
    for k in order:
      got[k].append(_once(*calls[k]))
  med = lambda xs, k: 1000 * statistics.median(x[k] for x in xs)

  def stats(own):
    out = {"ms": med(own, 0), "user_ms": med(own, 1), "sys_ms": med(own, 2)}
    if ref:
      other = got[-1]
      out["ref_ms"] = med(other, 0)
      out["rel"] = statistics.median(a[0] / b[0] for a, b in zip(own, other))
      out["user_rel"] = statistics.median(a[1] / max(b[1], 1e-9) for a, b in zip(own, other))
    return out

  out = stats(got[0])
  if also:
    out["also"] = [stats(got[1 + k]) for k in range(len(also))]
  return out


def timed(fn, args, repeats):
  """Median wall ms of `repeats` calls after 2 warm-up calls."""
  return timed_stats(fn, args, repeats)["ms"]


def compiled_flops(jitted, args):
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def matmul_peak(n=2048, repeats=10):
  """GFLOP/s of a jitted float32 n x n x n matmul: this machine's practical peak."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  ms = timed(jax.jit(jnp.dot), (a, a), repeats)
  return 2 * n ** 3 / (ms / 1000) / 1e9


def build(files, bindings):
  """The decoder, its task's layer mask and optimizer, as the gin config defines them."""
  import gin  # pylint: disable=g-import-not-at-top
  from adacomp import gin_utils, tasks, training  # pylint: disable=g-import-not-at-top
  from adacomp.models import build as build_lib  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin_utils.parse(files, bindings, finalize=False)
  model = build_lib.build_decoder(VOCAB)
  seq_len = gin.query_parameter("train.seq_len")
  mask = tasks.position_layer_mask(seq_len, model.config.num_layers)
  return model, mask, training.make_optimizer(100)


def method_sizes(name, d_model, a):
  sizes = size_bindings(d_model, a.num_layers, a.seq_len)
  if name == "tokenformer":
    sizes += [f"tokenformer_attention.n_qkv = {d_model}",
              f"tokenformer_attention.n_out = {d_model}", f"tokenformer_ffn.n_ffn = {4 * d_model}"]
  if name in NARROW:
    sizes += [f"DecoderConfig.d_ff = {4 * d_model // NARROW[name]}"]
  return sizes


def _train_step(model, mask, tx, params):
  """train.py's jitted step; a stage that freezes parameters (make_optimizer.trainable)
  computes no gradient for them, as there."""
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from adacomp import training  # pylint: disable=g-import-not-at-top
  try:
    trainable = gin.query_parameter("make_optimizer.trainable")
  except ValueError:  # not bound: everything trains
    trainable = None
  grad_mask = training.trainable_mask(trainable, params)
  # The state is donated, as train.py's step donates it: the new parameters and optimizer state
  # reuse the old buffers. Without it every step writes them into fresh memory, and on this VM
  # the page faults of that memory cost more than the arithmetic of a SkipDecode step.
  return jax.jit(training.make_train_step(model, tx, 0, layer_mask=mask, grad_mask=grad_mask),
                 donate_argnums=0)


def _stepper(step, state):
  """A callable (batch) -> (state, metrics) that threads the donated state from step to step,
  as the training loop does (each call consumes the previous call's state)."""
  box = [state]

  def run(batch):
    box[0], metrics = step(box[0], batch)
    return box[0], metrics

  return run


def _forward(model, mask):
  """The evaluation forward pass: logits and the mean sown MACs per token."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from adacomp import scoring  # pylint: disable=g-import-not-at-top

  def forward(params, ids):
    logits, mut = model.apply({"params": params}, ids, layer_mask=mask,
                              mutable=["intermediates"])
    return logits, jnp.mean(scoring.macs_per_token(mut["intermediates"], ids.shape, mask))

  return jax.jit(forward)


def _forward_call(model, mask, params, ids):
  """The evaluation forward pass (`_forward`) as a call (fn, args) and its mean sown MACs per
  token."""
  fwd = _forward(model, mask)
  return fwd, (params, ids), float(fwd(params, ids)[1])


def _time_forward(model, mask, params, ids, repeats, ref=None, also=()):
  """timed_stats of the evaluation forward pass (`_forward`), with "macs" (its mean sown MACs
  per token) and "fn", "args" (the call, for the rows that interleave with it)."""
  fwd, args, macs = _forward_call(model, mask, params, ids)
  return dict(timed_stats(fwd, args, repeats, ref, also), macs=macs, fn=fwd, args=args)


def _token_ids(a):
  """The timed rows' token ids [batch, seq_len]: the same for every method and width."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax.random.randint(jax.random.key(1), (a.batch, a.seq_len), 0, VOCAB, jnp.int32)


def _init(model, ids, tx=None, abstract=False):
  """Fresh params (and a train state when tx is given); shapes only when `abstract`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  from adacomp import training  # pylint: disable=g-import-not-at-top

  def init():
    params = meta.unbox(model.init(jax.random.key(0), ids[:1])["params"])
    if tx is None:
      return params
    return training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))

  return jax.eval_shape(init) if abstract else init()


def calibrate_causal(model, params, ids, sparsity):
  """Fresh causal predictors with each routed FFN's threshold fitted to its own sparsity
  quantile, as a trained model's pinball loss fits it on training data: layer by layer (a
  layer's inputs depend on the thresholds below it), tau_l halfway between the k-th and
  (k + 1)-th largest predictor logits of layer l over the tokens of `ids`, k = (1 - sparsity)
  of them, so exactly k execute there. Returns the params and each layer's executed fraction.
  `measure` fits them on the timed batch, so a causal row executes the work of its top-k twin
  and the two differ by the causal path's own costs. (On
  other data a trained threshold's count varies around its share, and the sown MACs follow
  it. The joint bisection of every layer's threshold used before left layers at 0.18-0.37
  of the tokens: the layers below moved after a layer's bracket had closed.)"""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  @jax.jit
  def run(params):
    """Each layer's predictor logits [layers, b, t] and executed fraction [layers]."""
    _, mut = model.apply({"params": params}, ids, mutable=["intermediates"],
                         capture_intermediates=lambda module, _: module.name == "causal")
    ffn = mut["intermediates"]["blocks"]["ffn"]
    return ffn["causal"]["__call__"][0][..., 0], jnp.mean(ffn["executed"][0], axis=(1, 2))

  def with_threshold(tau):
    ffn = dict(params["blocks"]["ffn"], causal_threshold=jnp.asarray(tau, jnp.float32))
    return dict(params, blocks=dict(params["blocks"], ffn=ffn))

  tau = np.asarray(params["blocks"]["ffn"]["causal_threshold"], np.float32).copy()
  k = int(round((1 - sparsity) * ids.size))
  for layer in range(tau.shape[0]):
    logits = np.sort(np.asarray(run(with_threshold(tau))[0][layer]).reshape(-1))[::-1]
    if k == 0:
      tau[layer] = logits[0] + 1
    elif k == logits.size:
      tau[layer] = logits[-1] - 1
    else:
      tau[layer] = (logits[k - 1] + logits[k]) / 2
  return with_threshold(tau), np.asarray(run(with_threshold(tau))[1])


def unrolled_flops(files, bindings, mode, ids, batch):
  """XLA's compiled FLOPs of the step with the layers unrolled (XLA's cost analysis counts a
  scanned loop's body once), lowered from shapes alone."""
  model, mask, tx = build(files, bindings + ["DecoderConfig.scan_layers = False"])
  if mode == "train":
    state = _init(model, ids, tx, abstract=True)
    return compiled_flops(_train_step(model, mask, tx, state.params), (state, batch))
  return compiled_flops(_forward(model, mask), (_init(model, ids, abstract=True), ids))


def measure(name, d_model, a, refs):
  """{'train': stats, 'infer': stats, 'infer causal': stats} for one method: timed_stats dicts
  with "flops" (XLA's, unrolled), "macs" (sown, per token; inference) and "executed" (causal).
  The dense method fills `refs` with its timed calls; every other method's calls are
  interleaved with them (timed_stats' `ref`), so its `rel` is a paired ratio."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  files, train_b, infer_b = METHODS[name]
  sizes = method_sizes(name, d_model, a)
  ids = _token_ids(a)
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1),
           "weights": jnp.ones(ids.shape, jnp.float32),
           "target_bytes": jnp.ones(ids.shape, jnp.float32)}
  is_ref = name == "dense"
  out = {}
  if "train" in a.modes:
    model, mask, tx = build(files, sizes + train_b)
    state = _init(model, ids, tx)
    run = _stepper(_train_step(model, mask, tx, state.params), state)
    del state  # the stepper holds (and donates) it
    out["train"] = dict(timed_stats(run, (batch,), a.repeats, None if is_ref else refs["train"]),
                        flops=unrolled_flops(files, sizes + train_b, "train", ids, batch))
    if is_ref:
      refs["train"] = (run, (batch,))
  if "infer" in a.modes and infer_b is not None:
    model, mask, _ = build(files, sizes + train_b + infer_b)
    params = _init(model, ids)
    if any(b.startswith("routed_ffn.compute") for b in infer_b):
      # What generation and eval.py run: causal decisions (gather compute: the executed
      # tokens in a bucket of slots, `routing.bucket_sizes`), thresholds fitted to the sparsity.
      # Timed in the same rounds as the top-k twin (and dense): the two compare on one host.
      causal_b = sizes + train_b + infer_b + ["routed_ffn.decision = 'causal'"]
      c_model, c_mask, _ = build(files, causal_b)
      sparsity = c_model.config.ffn_cls.keywords["sparsity"]  # the bound routed_ffn
      c_params, frac = calibrate_causal(c_model, _init(c_model, ids), ids, sparsity)
      c_fwd, c_args, c_macs = _forward_call(c_model, c_mask, c_params, ids)
      res = _time_forward(model, mask, params, ids, a.repeats, refs["infer"],
                          also=[(c_fwd, c_args)])
      out["infer causal"] = dict(res.pop("also")[0], macs=c_macs, executed=float(np.mean(frac)),
                                 flops=unrolled_flops(files, causal_b, "infer", ids, batch))
    else:
      res = _time_forward(model, mask, params, ids, a.repeats,
                          None if is_ref else refs["infer"])
    if is_ref:
      refs["infer"] = (res["fn"], res["args"])
    out["infer"] = dict(res, flops=unrolled_flops(files, sizes + train_b + infer_b, "infer", ids,
                                                  batch))
  for res in out.values():  # the calls are not kept past this method, except the reference's
    res.pop("fn", None)
    res.pop("args", None)
  return out


def measure_unit(name, d_model, a, ref=None):
  """The inference FFN alone (the method's `ffn_cls` in its inference compute) on normed random
  activations [batch, seq_len, d_model]: timed_stats (interleaved with `ref`, the dense unit's
  call, when given) with "macs" (sown, per token) and "fn", "args" (the call). The unit's own
  ratio, for the profile of where a whole-model ratio goes (see `breakdown`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  files, train_b, infer_b = METHODS[name]
  model, _, _ = build(files, method_sizes(name, d_model, a) + train_b + infer_b)
  cfg = model.config
  ffn = cfg.ffn_cls(d_ff=cfg.d_ff, activation=cfg.activation)
  x = jax.random.normal(jax.random.key(2), (a.batch, a.seq_len, d_model), jnp.float32)
  kw = {"layer": jnp.int32(0)} if getattr(ffn, "takes_layer", False) else {}
  rngs = {"params": jax.random.key(0), "routing": jax.random.key(1)}
  params = meta.unbox(ffn.init(rngs, x, **kw)["params"])

  def forward(params, x):
    y, mut = ffn.apply({"params": params}, x, **kw, rngs={"routing": jax.random.key(1)},
                       mutable=["intermediates"])
    macs = mut["intermediates"].get("macs")
    return y, (jnp.mean(macs[0]) if macs else jnp.float32(2 * d_model * cfg.d_ff))

  fwd = jax.jit(forward)
  return dict(timed_stats(fwd, (params, x), a.repeats, ref), macs=float(fwd(params, x)[1]),
              fn=fwd, args=(params, x))


def measure_rest(d_model, a, ref=None):
  """The dense model's inference forward with its FFNs all but removed (d_ff 8), interleaved
  with `ref` (the dense model's forward) when given: `_time_forward`'s stats. What routing an
  FFN does not touch (attention, norms, embedding, head), timed inside the model, where it runs
  (the layer loop, its weight slices and its fusions)."""
  files = METHODS["dense"][0]
  model, mask, _ = build(files, size_bindings(d_model, a.num_layers, a.seq_len) +
                         ["DecoderConfig.d_ff = 8"])
  ids = _token_ids(a)
  return _time_forward(model, mask, _init(model, ids), ids, a.repeats, ref)


def measure_attention_parts(d_model, a, dense_unit):
  """Rows of the rest's profile: one layer's attention (the decoder's own MultiHeadAttention)
  and its parts at the model's shapes, each timed interleaved with `dense_unit` (the dense FFN
  alone, measure_unit's call): the q/k/v/o projections (the module's four einsums), the core
  (layers.attention.dot_product_attention under the causal mask, in the module's causal query
  blocks) and, as a control, one matmul with the core's executed MACs. MACs `counted` are what
  the model sows (the core: the visible keys, t (t + 1) / 2 per head); `executed` what the
  program multiplies (the core: (n + 1) / 2n of the t x t square of scores and of the value
  product, n = causal_blocks(t) query blocks)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from layers.attention import (  # pylint: disable=g-import-not-at-top
      MultiHeadAttention, causal_blocks, causal_mask, dot_product_attention)
  b, t, hd = a.batch, a.seq_len, 64
  h = max(1, d_model // hd)
  inner = h * hd
  keys = jax.random.split(jax.random.key(4), 6)
  x = jax.random.normal(keys[0], (b, t, d_model), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  attn = MultiHeadAttention(h, hd)
  params = attn.init(keys[1], x, pos)
  w = [jax.random.normal(k, (d_model, h, hd), jnp.float32) * d_model ** -0.5 for k in keys[2:6]]
  q, k, v = (jax.random.normal(kk, (b, t, h, hd), jnp.float32) for kk in keys[3:6])
  mask = causal_mask(pos, pos)
  control_a = jax.random.normal(keys[2], (b * h * t, hd), jnp.float32)

  def projections(x, wq, wk, wv, wo):
    qkv = sum(jnp.einsum("btd,dhk->bthk", x, m) for m in (wq, wk, wv))
    return jnp.einsum("bthk,dhk->btd", qkv, wo)

  core_counted = b * h * hd * t * (t + 1)  # scores and value product over the visible keys
  blocks = causal_blocks(t, attn.causal_block)  # the module's: (n + 1) / 2n of the square
  core_executed = 2 * b * h * t * t * hd * (blocks + 1) // (2 * blocks)
  control_b = jax.random.normal(keys[3], (hd, core_executed // (b * h * t * hd)), jnp.float32)
  parts = [
      ("attention module (one layer)", jax.jit(lambda p, x: attn.apply(p, x, pos)), (params, x),
       4 * b * t * d_model * inner + core_counted, 4 * b * t * d_model * inner + core_executed),
      ("  q/k/v/o projections", jax.jit(projections), (x, *w),
       4 * b * t * d_model * inner, 4 * b * t * d_model * inner),
      ("  core: causal softmax attention", jax.jit(lambda q, k, v: dot_product_attention(
          q, k, v, mask, blocks=blocks)), (q, k, v), core_counted, core_executed),
      ("  control: one matmul of the core's executed MACs", jax.jit(jnp.dot),
       (control_a, control_b), 0, core_executed),
  ]
  rows = []
  for part, fn, args, counted, executed in parts:
    print(f"d_model {d_model}: rest profile, {part.strip()}", file=sys.stderr, flush=True)
    stats = timed_stats(fn, args, a.repeats, dense_unit)
    rows.append({"d_model": d_model, "part": part.strip(), "ms": stats["ms"],
                 "t_vs_dense_ffn": stats["rel"], "macs_counted": counted,
                 "macs_executed": executed,
                 "gflops_executed": 2 * executed / (stats["ms"] / 1000) / 1e9,
                 "threads": stats["user_ms"] / stats["ms"]})
  return rows


def breakdown(names, d_model, a, whole, dense_forward):
  """Rows of the profile for the methods whose FFN routes: the FFN alone (measure_unit) against
  the dense FFN alone, the in-model rest (measure_rest, against `dense_forward`, the dense
  model's timed call) and the floor they give: the t/dense the whole model would have if only
  its FFNs changed, each by its own measured t/dense. Every ratio is a paired one."""
  from layers.mlp import DenseFFN  # pylint: disable=g-import-not-at-top
  dense = measure_unit("dense", d_model, a)
  dense_macs, dense_call = dense["macs"], (dense["fn"], dense["args"])
  model_dense_macs = whole["dense"]["infer"]["macs"]
  rest = measure_rest(d_model, a, dense_forward)
  rest_rel = rest["rel"]  # the rest's share of the dense forward's time
  parts = measure_attention_parts(d_model, a, dense_call)
  rows = []
  for name in names:
    files = METHODS[name][0]
    if name == "dense" or METHODS[name][2] is None or whole.get(name, {}).get("infer") is None:
      continue
    model, _, _ = build(files, method_sizes(name, d_model, a) + METHODS[name][1])
    if model.config.ffn_cls is DenseFFN:
      continue
    unit = measure_unit(name, d_model, a, dense_call)  # interleaved with the dense unit
    ms, macs = unit["ms"], unit["macs"]
    t_unit, m_unit = unit["rel"], macs / dense_macs
    res = whole[name]["infer"]
    model_macs = res["macs"] / model_dense_macs
    floor = rest_rel + (1 - rest_rel) * t_unit  # the rest as it is, each FFN by its unit
    rows.append({"d_model": d_model, "method": name, "unit_ms": ms, "unit_t_rel": t_unit,
                 "unit_macs_rel": m_unit, "unit_ratio": t_unit / m_unit,
                 "dense_unit_ms": unit["ref_ms"], "rest_ms": rest["ms"], "rest_share": rest_rel,
                 "rest_macs_share": rest["macs"] / model_dense_macs,
                 "model_ms": res["ms"], "floor_t_rel": floor, "floor_ratio": floor / model_macs,
                 "model_vs_floor": res["rel"] / floor})
  return rows, parts


# AS-ViT at a research width: a ViT on 224 x 224 images in 16 x 16 patches (196 tokens + the
# class token), pruning after a quarter, half and three quarters of the blocks, inference in
# static packed capacities (the fraction of image tokens kept after each stage). Training is
# the method's soft-mask computation over every token (the thresholds learn from every token's
# mask): it is not a routed path, so only inference is timed.
VIT_BUDGETS = {"as_vit keep 0.7/0.5/0.3": (0.7, 0.5, 0.3),
               "as_vit keep 0.5/0.3/0.15": (0.5, 0.3, 0.15)}


def _vit_macs(cfg, capacity):
  """MACs per image: patch embedding, blocks on 1 + the kept tokens, head (dense_macs_per_image's
  terms, with each stage's kept count; the pruners' scores are elementwise)."""
  from adacomp.models import vit  # pylint: disable=g-import-not-at-top
  n = cfg.num_patches
  macs = n * cfg.patch_size ** 2 * cfg.channels * cfg.d_model + cfg.d_model * cfg.num_classes
  tokens = n + 1
  for i in range(cfg.num_layers):
    macs += vit.block_macs(cfg, tokens)
    if capacity and i + 1 in cfg.prune_after:
      tokens = 1 + capacity[list(cfg.prune_after).index(i + 1)]
  return float(macs)


def measure_vit(d_model, a):
  """{name: timed_stats with "flops", "macs" (per image), "images"} for the dense ViT and each
  AS-ViT budget, the budgets interleaved with the dense ViT."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from adacomp.models import vit  # pylint: disable=g-import-not-at-top
  layers = max(4, a.num_layers)
  q = layers // 4
  cfg = vit.ViTConfig(image_size=224, patch_size=16, channels=3, num_classes=1000,
                      num_layers=layers, d_model=d_model, num_heads=max(1, d_model // 64),
                      head_dim=64, d_ff=4 * d_model, prune_after=(q, 2 * q, 3 * q),
                      threshold_init=(0.003, 0.006, 0.009))
  images = max(1, a.batch * a.seq_len // (cfg.num_patches + 1))
  x = jax.random.normal(jax.random.key(3), (images, 224, 224, 3), jnp.float32)
  out, ref = {}, None
  for name, keep in [("vit dense", None)] + list(VIT_BUDGETS.items()):
    model = vit.ViT(cfg if keep else dataclasses.replace(cfg, prune_after=(), threshold_init=()))
    params = model.init(jax.random.key(0), x[:1])["params"]
    capacity = None if keep is None else tuple(int(f * cfg.num_patches) for f in keep)
    fn = jax.jit(lambda p, x, m=model, c=capacity: m.apply({"params": p}, x, capacity=c))
    stats = timed_stats(fn, (params, x), a.repeats, ref)  # budgets interleaved with dense
    ref = ref or (fn, (params, x))
    out[name] = dict(stats, flops=compiled_flops(fn, (params, x)), macs=_vit_macs(cfg, capacity),
                     images=images)
  return out


def _model_macs(name, d_model, a):
  """MACs per token of a method whose inference forward was not timed (a --modes=train run, or
  SkipDecode, which has none): the forward of its inference config (its training config under
  the training layer mask for SkipDecode) on fresh parameters and the timed rows' token ids, as
  `measure` would sow them. Fresh, not zero, parameters: a router of zeros routes nothing like a
  fresh one."""
  files, train_b, infer_b = METHODS[name]
  model, mask, _ = build(files, method_sizes(name, d_model, a) + train_b + (infer_b or []))
  ids = _token_ids(a)
  return float(_forward(model, mask)(_init(model, ids), ids)[1])


def _timing_fields(r):
  """The paired-timing columns every row carries, from a timed_stats dict (the reference's own
  row has no `ref`: its dense time is its own and its user ratio 1)."""
  return {"dense_ms": r.get("ref_ms", r["ms"]), "user_ms": r["user_ms"], "sys_ms": r["sys_ms"],
          "user_rel": r.get("user_rel", 1.0)}


def _num(x, digits):
  return "-" if x != x else f"{x:.{digits}f}"  # NaN: not measured


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default=",".join(SHORT),
                 help=f"comma-separated, from: {', '.join(SHORT)}")
  p.add_argument("--d_models", default="512,1024")
  p.add_argument("--num_layers", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--modes", default="train,infer")
  p.add_argument("--quick", action="store_true", help="d_model 128, 2 layers, 64 tokens")
  p.add_argument("--vit", default=True, action=argparse.BooleanOptionalAction,
                 help="AS-ViT rows: ViT on 224 x 224 images, static packed capacities")
  p.add_argument("--breakdown", action="store_true",
                 help="also profile the inference FFN alone vs the dense FFN, and the share "
                      "of the dense forward that routing does not touch")
  p.add_argument("--output", default=None, help="JSON rows")
  a = p.parse_args(argv)
  if a.quick:
    a.d_models, a.num_layers, a.seq_len, a.repeats = "128", 2, 64, 2
  names = [SHORT.get(m.strip(), m.strip()) for m in a.methods.split(",") if m.strip()]
  unknown = [m for m in names if m not in METHODS]
  if unknown:
    p.error(f"unknown --methods {unknown}; choose from {list(SHORT)}")
  # Dense first: every other row is timed interleaved with it.
  names = ["dense"] + [n for n in names if n != "dense"]
  a.modes = [m.strip() for m in a.modes.split(",")]

  from adacomp import hostmem  # pylint: disable=g-import-not-at-top
  kept = hostmem.keep_freed_memory()  # before jax's first computation, as cli.run does
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from adacomp import kernels  # pylint: disable=g-import-not-at-top
  from adacomp.methods import registry  # pylint: disable=g-import-not-at-top,unused-import
  logging.set_verbosity(logging.WARNING)
  kernels.configure_kernels("auto")
  peak = matmul_peak()
  device = jax.devices()[0]
  print(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}, float32; "
        f"matmul peak {peak:.1f} GFLOP/s; {a.num_layers} layers, batch {a.batch} x "
        f"{a.seq_len} tokens, median of {a.repeats}; malloc "
        f"{'keeps freed buffers (adacomp.hostmem)' if kept else 'default'}", flush=True)
  rows, units, attention_parts = [], [], []
  for d in [int(x) for x in a.d_models.split(",")]:
    results, refs = {}, {}
    for name in names:
      print(f"d_model {d}: {name}", file=sys.stderr, flush=True)
      try:
        results[name] = measure(name, d, a, refs)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
              file=sys.stderr, flush=True)
      if "dense" not in results:  # every other row is timed against it
        raise SystemExit(f"ERROR: the dense reference failed at d_model {d}; see above.")
    dense = results["dense"]
    if a.breakdown and "infer" in dense:
      unit_rows, part_rows = breakdown(names, d, a, results, refs["infer"])
      units, attention_parts = units + unit_rows, attention_parts + part_rows
    refs.clear()  # the dense calls (and the train state they hold) are not needed past here
    # MACs per token of the dense model: its timed forward's, or (training only) one forward.
    dense_macs = dense["infer"]["macs"] if "infer" in dense else _model_macs("dense", d, a)
    for name, res in results.items():
      # MACs per token of the inference model; SkipDecode's under its layer mask, as trained.
      own = res["infer"]["macs"] if "infer" in res else _model_macs(name, d, a)
      for mode in list(a.modes) + ["infer causal"]:
        ref = "infer" if mode == "infer causal" else mode
        if mode not in res or ref not in dense:
          continue
        r = res[mode]
        mode_macs = r["macs"] if mode == "infer causal" else own
        t_rel = r.get("rel", r["ms"] / dense[ref]["ms"])  # paired with dense's rounds
        tokens = a.batch * a.seq_len
        useful = 2 * mode_macs * tokens * (3 if mode == "train" else 1)
        gflops = useful / (r["ms"] / 1000) / 1e9
        shown = mode
        if mode == "infer" and "infer causal" in res:
          shown = "infer top-k (not causal)"
        elif mode == "infer causal":
          shown = f"infer causal ({r['executed']:.2f} executed)"
        rows.append({"d_model": d, "method": name, "mode": shown, "ms": r["ms"], "t_rel": t_rel,
                     "macs_rel": mode_macs / dense_macs, "ratio": t_rel / (mode_macs / dense_macs),
                     # XLA counts a switch's costliest branch (every token's bucket): not shown.
                     "xla_rel": (float("nan") if mode == "infer causal"
                                 else r["flops"] / dense[ref]["flops"]), "gflops": gflops,
                     "peak_frac": gflops / peak, **_timing_fields(r)})
    if a.vit and "infer" in a.modes:
      print(f"d_model {d}: ViT / AS-ViT", file=sys.stderr, flush=True)
      vits = measure_vit(d, a)
      ref = vits["vit dense"]
      for name, r in vits.items():
        t_rel, m_rel = r.get("rel", 1.0), r["macs"] / ref["macs"]
        gflops = 2 * r["macs"] * r["images"] / (r["ms"] / 1000) / 1e9
        rows.append({"d_model": d, "method": f"{name} ({r['images']} images)", "mode": "infer",
                     "ms": r["ms"], "t_rel": t_rel, "macs_rel": m_rel, "ratio": t_rel / m_rel,
                     "xla_rel": r["flops"] / ref["flops"], "gflops": gflops,
                     "peak_frac": gflops / peak, **_timing_fields(r)})
  print("\n| d_model | method | mode | ms | t/dense | MACs | ratio | XLA | t/XLA | GFLOP/s "
        "| %peak |")
  print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['d_model']} | {r['method']} | {r['mode']} | {r['ms']:.1f} | {r['t_rel']:.3f} | "
          f"{r['macs_rel']:.3f} | {r['ratio']:.2f} | {_num(r['xla_rel'], 3)} | "
          f"{_num(r['t_rel'] / r['xla_rel'], 2)} | {r['gflops']:.1f} | "
          f"{100 * r['peak_frac']:.0f}% |")
  if rows:
    print("\nCPU time of every row (getrusage, every thread of the process): user is XLA's "
          "arithmetic, sys mostly the page faults of fresh buffers; threads = user / wall, how "
          "many of the cores the row keeps busy; user/dense is the paired ratio of user time "
          "(what the row's arithmetic costs against dense's) and CPU ratio that over the MACs: "
          "where the wall ratio is above it, the time the row loses is cores left idle, not "
          "arithmetic:\n")
    print("| d_model | method | mode | wall ms | dense wall ms | user ms | sys ms | threads "
          "| user/dense | MACs | CPU ratio |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
      print(f"| {r['d_model']} | {r['method']} | {r['mode']} | {r['ms']:.1f} | "
            f"{r['dense_ms']:.1f} | {r['user_ms']:.1f} | {r['sys_ms']:.1f} | "
            f"{r['user_ms'] / r['ms']:.2f} | {r['user_rel']:.3f} | {r['macs_rel']:.3f} | "
            f"{r['user_rel'] / r['macs_rel']:.2f} |")
  if units:
    print("\nProfile of the inference rows: the FFN alone (unit) against the dense FFN alone; "
          "rest = the dense model with d_ff 8 (attention, norms, head, inside the model), its "
          "share of the dense time and of the dense MACs; floor = the t/dense the model would "
          "have if only its FFNs changed, each by the unit's t/dense, and that over the MACs; "
          "model / floor = what the assembled model adds:\n")
    print("| d_model | method | unit ms | dense unit ms | unit t/dense | unit MACs | unit ratio "
          "| rest time share | rest MAC share | floor ratio | model / floor |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in units:
      print(f"| {r['d_model']} | {r['method']} | {r['unit_ms']:.2f} | {r['dense_unit_ms']:.2f} "
            f"| {r['unit_t_rel']:.3f} | {r['unit_macs_rel']:.3f} | {r['unit_ratio']:.2f} | "
            f"{r['rest_share']:.2f} | {r['rest_macs_share']:.2f} | {r['floor_ratio']:.2f} | "
            f"{r['model_vs_floor']:.2f} |")
  if attention_parts:
    print("\nProfile of the rest: one layer's attention and its parts, each timed interleaved "
          "with the dense FFN alone (x dense FFN: the part's time over the FFN's); MACs counted "
          "are what the model sows (the core's visible keys), executed what the program "
          "multiplies (the core: its causal query blocks, (n + 1) / 2n of the t x t square); "
          "GFLOP/s of the executed MACs:\n")
    print("| d_model | part | ms | x dense FFN | GMACs counted | GMACs executed | GFLOP/s "
          "| threads |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in attention_parts:
      print(f"| {r['d_model']} | {r['part']} | {r['ms']:.2f} | {r['t_vs_dense_ffn']:.3f} | "
            f"{r['macs_counted'] / 1e9:.3f} | {r['macs_executed'] / 1e9:.3f} | "
            f"{r['gflops_executed']:.1f} | {r['threads']:.2f} |")
  if a.output:
    with open(a.output, "w") as f:
      json.dump({"peak_gflops": peak, "rows": rows, "units": units,
                 "attention_parts": attention_parts}, f, indent=2)


if __name__ == "__main__":
  main()
