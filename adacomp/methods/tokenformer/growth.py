"""TokenFormer's progressive scaling: grow a trained checkpoint by appending parameter tokens.

TokenFormer (arXiv 2410.23168, sec. 3.3) scales a trained model by appending new key-value
parameter tokens to its Pattention layers and training on. This module reads the latest
checkpoint of a TokenFormer workdir, appends tokens to the chosen Pattention layers, extends the
optimizer state to match, and writes a NEW workdir (the source is only read) whose config.gin is
the source's operative config plus the new token counts and a fixed tau, so that

    python train.py --gin_file=NEW/config.gin --workdir=NEW --gin_bindings='train.num_steps=N'

resumes at the source's step, on the source's data-stream position, with the grown model.

Function preservation. A Pattention row is GeLU(s_i * tau / ||s||) with s = x K_P^T over all n
tokens, so appending tokens (K_new, V_new) changes it in two ways: the new tokens contribute
GeLU(.) V_new, and their scores enter every row's norm ||s||. With tau held at its old value
(tau_tokens bound to the old n; tau = sqrt(n_new) would rescale every score by
sqrt(n_new / n_old)):
  * K_new = 0 ("zero_keys", the default): the new scores are exactly 0, so ||s|| is unchanged and
    GeLU(0) = 0 removes the new values: the function is preserved exactly (up to float
    summation order, ~1e-6 relative). Training still moves the new tokens: the keys' gradient
    is GeLU'(0) * tau / ||s|| * <dL/dy, v_j> * x = 0.5 tau/||s|| <dL/dy, v_j> x, non-zero
    because V_new is random (the grown model's own init); the values' gradient GeLU(0) = 0 is
    zero until the keys have moved (one step). LoRA's trick with the roles of the sides swapped.
  * V_new = 0, K_new ~ N(0, key_std) ("zero_values", once suggested as exact): the new tokens
    add nothing, but every old score is multiplied by c = ||s_old|| / sqrt(||s_old||^2 +
    ||s_new||^2) < 1, so the function is preserved only approximately: each Pattention output
    moves by at most max|GeLU'| * (1 - c) * |z| per score (|GeLU'| <= 1.13 for the tanh form),
    (1 - c) ~ ||s_new||^2 / (2 ||s_old||^2), i.e. quadratic in key_std. Exactly, the grown layer
    equals the old one evaluated with tau' = c * tau row by row (tested).
  * K_new = V_new = 0 (the paper's text, "initialised to zero"): exact, but both gradients are
    zero (new scores 0 -> value gradient GeLU(0) = 0; key gradient 0.5 tau/||s|| <g, 0> x = 0
    and the norm's term is proportional to s_new = 0), so Adam never moves them: not offered.
  * "random" (the released code: new tokens keep their fresh init, keys N(0, 0.02), values
    N(0, 2/(L sqrt d)), and its tau = sqrt(n_new)): not function-preserving; offered for
    comparison (tau is still fixed here).

Optimizer state: the optax state tree (clip -> adamw: ScaleByAdamState(count, mu, nu), ...) is
read with the source's own optimizer as the restore target and mapped leaf by leaf onto the
grown optimizer's abstract state: equal shapes are copied, the token axis (second to last) of a
grown Pattention's mu/nu is extended with zeros. Step counts are kept, so the learning-rate
schedule continues; with mu = nu = 0 and Adam's bias correction at step k >> 1, the new rows'
first update is about 0.45 lr * sign(g) (vs lr for a fresh Adam), a gentle start.

Schedule: `make_optimizer.decay_steps` defaults to the run's num_steps, which the resumed run
changes; the grown config binds it to the source's effective decay_steps unless `decay_steps` is
given, so the learning rate never jumps back up. Plan a grown run by training the source with
decay_steps = the total steps (then both parts see one cosine), or pass decay_steps here.

Granularity: in a layer-scanned model one parameter array holds every layer, and the token
counts are gin parameters per role, so tokens are added per group, in every layer at once:
'qkv' (query, key and value Pattentions share n_qkv), 'out' (n_out), 'ffn' (n_ffn). A
selection that covers part of a group is an error that names the group.
"""
import dataclasses
import json
import math
import re
from typing import Callable, Dict, Optional, Tuple

import flax
import flax.linen as nn
import gin
import jax
import numpy as np
from etils import epath

from adacomp import checkpointing
from adacomp import gin_utils
from adacomp import sharding
from adacomp import training
from adacomp.models import build
from adacomp.models.decoder import DecoderConfig

INITS = ("zero_keys", "zero_values", "random")

# Pattention module path (suffix) -> (group, gin factory, count parameter, tau parameter).
_GROUPS = (
    (re.compile(r"attn/(query|key|value)$"), "qkv", "tokenformer_attention", "n_qkv",
     "tau_tokens_qkv"),
    (re.compile(r"attn/out$"), "out", "tokenformer_attention", "n_out", "tau_tokens_out"),
    (re.compile(r"ffn/pattention$"), "ffn", "tokenformer_ffn", "n_ffn", "tau_tokens"),
)


class GrowthError(ValueError):
  """A growth request that cannot be carried out (missing source, bad target or selection)."""


@dataclasses.dataclass(frozen=True)
class GroupPlan:
  """Growth of one group of Pattention layers: token count old -> new, tau fixed."""
  group: str
  old: int
  new: int
  tau_tokens: int
  modules: Tuple[str, ...]


def pattention_modules(params) -> Dict[str, str]:
  """{module path: group} for every Pattention (a module holding `key` and `value` whose path
  ends like a TokenFormer projection), e.g. 'blocks/attn/query': 'qkv'."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  found = {}
  for path in flat:
    if not path.endswith("/key") or path[:-len("key")] + "value" not in flat:
      continue
    module = path[:-len("/key")]
    for pattern, group, *_ in _GROUPS:
      if pattern.search(module):
        found[module] = group
  return found


def token_counts(params) -> Dict[str, int]:
  """{group: n} read from the parameter shapes (token axis: second to last)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  counts = {}
  for module, group in pattention_modules(params).items():
    n = flat[module + "/key"].shape[-2]
    if counts.setdefault(group, n) != n:
      raise GrowthError(f"Pattention layers of group {group!r} have different token counts "
                        f"({counts[group]} and {n} at {module}); grow.py needs one per group.")
  return counts


def plan_growth(params, select: str = ".*", add: Optional[int] = None,
                factor: Optional[float] = None,
                tau_tokens: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, GroupPlan]:
  """Which groups grow and to how many tokens. `select` is searched in the Pattention module
  paths ('blocks/attn/query', 'block_0/ffn/pattention', ...); exactly one of add / factor.
  `tau_tokens` gives each group's current tau binding (None: tau = sqrt of the current n)."""
  if (add is None) == (factor is None):
    raise GrowthError("Give exactly one of --add (tokens to append) and --factor (new count = "
                      "factor * old count).")
  if add is not None and add < 1:
    raise GrowthError(f"--add={add}: append at least one token.")
  if factor is not None and factor <= 1:
    raise GrowthError(f"--factor={factor}: must exceed 1 to grow.")
  modules = pattention_modules(params)
  if not modules:
    raise GrowthError("The source checkpoint has no Pattention layers: it is not a TokenFormer "
                      "run. Train one with --gin_file=configs/tokenformer.gin first.")
  try:
    pattern = re.compile(select)
  except re.error as e:
    raise GrowthError(f"--select={select!r} is not a regular expression ({e}).") from e
  chosen = {m for m in modules if pattern.search(m)}
  if not chosen:
    raise GrowthError(f"--select={select!r} matches no Pattention layer. Their paths are: "
                      f"{', '.join(sorted(modules))}.")
  counts = token_counts(params)
  tau_tokens = tau_tokens or {}
  plans = {}
  for group in sorted({modules[m] for m in chosen}):
    members = sorted(m for m, g in modules.items() if g == group)
    missing = [m for m in members if m not in chosen]
    if missing:
      raise GrowthError(
          f"--select={select!r} chooses part of group {group!r} ({', '.join(missing)} not "
          f"selected): its layers share one token count, so select all of "
          f"{', '.join(members)} or none.")
    old = counts[group]
    new = old + add if add is not None else int(math.ceil(old * factor))
    tau = tau_tokens.get(group)
    plans[group] = GroupPlan(group, old, new, old if tau is None else tau, tuple(members))
  return plans


def _pad_tokens(old: np.ndarray, new_shape, rows: np.ndarray) -> np.ndarray:
  """old [..., n_old, d] with `rows` [..., n_new - n_old, d] appended on the token axis."""
  out = np.concatenate([old, rows.astype(old.dtype)], axis=-2)
  assert out.shape == tuple(new_shape), (out.shape, new_shape)
  return out


def grow_params(params, fresh_params, plans: Dict[str, GroupPlan], init: str = "zero_keys",
                key_std: float = 0.02, seed: int = 0):
  """Source params with tokens appended per `plans`; new rows per `init` (module docstring).
  fresh_params: the grown model's own initialisation (the source of random values)."""
  if init not in INITS:
    raise GrowthError(f"init={init!r}; use one of {INITS}.")
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh_params), sep="/")
  rng = np.random.default_rng(seed)
  out = {}
  grown = {m for p in plans.values() for m in p.modules}
  for path, value in flat.items():
    value = np.asarray(jax.device_get(value))
    module, _, leaf = path.rpartition("/")
    if module not in grown:
      out[path] = value
      continue
    target = np.asarray(jax.device_get(fresh[path]))
    n_old = value.shape[-2]
    shape = target.shape[:-2] + (target.shape[-2] - n_old, target.shape[-1])
    if leaf == "key":
      rows = (np.zeros(shape) if init == "zero_keys" else
              rng.normal(0.0, key_std, shape))
    else:
      rows = np.zeros(shape) if init == "zero_values" else target[..., n_old:, :]
    out[path] = _pad_tokens(value, target.shape, rows)
  missing = set(fresh) ^ set(out)
  if missing:
    raise GrowthError(f"The grown model's parameters differ from the source's by name: "
                      f"{sorted(missing)[:6]}")
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def grow_opt_state(opt_state, target_abstract):
  """Source optimizer state mapped onto the grown optimizer's tree: leaves of equal shape are
  copied, grown leaves (Adam's mu / nu of a grown Pattention) get zero rows on the token axis."""

  def extend(old, target):
    old = np.asarray(jax.device_get(old))
    if old.shape == tuple(target.shape):
      return old
    if (old.ndim < 2 or old.shape[:-2] != tuple(target.shape[:-2]) or
        old.shape[-1] != target.shape[-1] or old.shape[-2] > target.shape[-2]):
      raise GrowthError(f"Optimizer state leaf of shape {old.shape} cannot grow to "
                        f"{tuple(target.shape)}.")
    rows = np.zeros(old.shape[:-2] + (target.shape[-2] - old.shape[-2], old.shape[-1]))
    return _pad_tokens(old, target.shape, rows)

  try:
    return jax.tree.map(extend, opt_state, target_abstract)
  except ValueError as e:
    if "structure" not in str(e):
      raise
    raise GrowthError(f"The source's optimizer state does not have the grown optimizer's tree "
                      f"structure ({e}); the optimizer settings must not change when growing.") \
        from e


class _Position:
  """Holds a data iterator's checkpointed state (get_state / set_state, as grain's)."""

  def __init__(self, state=None):
    self.state = state

  def get_state(self):
    return self.state

  def set_state(self, state):
    self.state = state


def _parse_config(text: str, source: str) -> None:
  gin.clear_config()
  gin_utils.parse([], [], finalize=False)
  gin_utils.parse_saved_config(text, source)  # a checkpoint's config is data, never code


def _query(name: str, default=None):
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def _build_state(meta: dict, seed: int):
  """(model, TrainState, abstract TrainState) for the currently parsed gin config."""
  model = build.build_decoder(meta["vocab_size"], DecoderConfig())
  tx = training.make_optimizer(gin.query_parameter("train.num_steps"))
  mesh = sharding.make_mesh()
  rules = sharding.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, abstract, _ = training.init_train_state(model, tx, meta["seq_len"], seed, mesh, rules)
  return model, state, abstract


def grown_bindings(plans: Dict[str, GroupPlan], decay_steps: int, source: str,
                   step: int) -> str:
  lines = [f"\n# Grown by scripts/grow.py from {source} at step {step}: new token counts, tau",
           "# fixed at its pre-growth value, and the learning-rate schedule of the source."]
  for _, group, factory, count, tau in _GROUPS:
    if group in plans:
      lines.append(f"{factory}.{count} = {plans[group].new}")
      lines.append(f"{factory}.{tau} = {plans[group].tau_tokens}")
  lines.append(f"make_optimizer.decay_steps = {decay_steps}")
  return "\n".join(lines) + "\n"


def grow_checkpoint(source: str, target: str, *, select: str = ".*", add: Optional[int] = None,
                    factor: Optional[float] = None, init: str = "zero_keys",
                    key_std: float = 0.02, decay_steps: Optional[int] = None, seed: int = 0,
                    log: Callable[[str], None] = print) -> dict:
  """Writes the grown checkpoint and config.gin into `target`; returns a summary dict.

  Leaves the gin config parsed as the grown model's (callers that train next re-parse).
  """
  if init not in INITS:
    raise GrowthError(f"--init={init!r}; use one of {INITS}.")
  target_path = epath.Path(target)
  if target_path.exists() and any(target_path.iterdir()):
    raise GrowthError(f"Target {target} exists and is not empty; growth writes a new workdir. "
                      f"Pass a new --target (or remove that directory).")
  if epath.Path(source).resolve() == target_path.resolve():
    raise GrowthError("--target must differ from --source: the source run is never modified.")
  try:
    step, meta = checkpointing.read_meta(source)
  except (checkpointing.CheckpointError, FileNotFoundError, ValueError) as e:
    raise GrowthError(f"Source {source}: {e}") from e
  log(f"Source {source}: step {step}")

  # The source model, restored with its own optimizer as the target tree.
  _parse_config(meta["gin_config"], f"checkpoint step {step} of {source}")
  source_num_steps = gin.query_parameter("train.num_steps")
  source_decay = _query("make_optimizer.decay_steps") or source_num_steps
  tau_bound = {"qkv": _query("tokenformer_attention.tau_tokens_qkv"),
               "out": _query("tokenformer_attention.tau_tokens_out"),
               "ffn": _query("tokenformer_ffn.tau_tokens")}
  _, _, abstract = _build_state(meta, seed)
  plans = plan_growth(abstract.params, select, add, factor, tau_bound)
  position = _Position()
  with checkpointing._read_only_manager(checkpointing.checkpoint_root(source)) as manager:  # pylint: disable=protected-access
    params, opt_state, _ = checkpointing.restore(manager, step, abstract, position)

  # The grown model: the source's config plus the new counts, fixed tau and schedule.
  decay = source_decay if decay_steps is None else decay_steps
  config = meta["gin_config"] + grown_bindings(plans, decay, source, step)
  _parse_config(config, f"checkpoint step {step} of {source} (grown)")
  _, fresh, grown_abstract = _build_state(meta, seed + 1)
  new_params = grow_params(params, fresh.params, plans, init, key_std, seed)
  new_opt_state = grow_opt_state(opt_state, grown_abstract.opt_state)

  checkpointing.ensure_writable(target)
  (target_path / "config.gin").write_text(config)
  state = training.TrainState(step=np.asarray(step, np.int32), params=new_params,
                              opt_state=new_opt_state)
  new_meta = dict(meta, gin_config=config, grown_from={"source": str(source), "step": step})
  manager = checkpointing.make_manager(target, async_save=False)
  checkpointing.save(manager, step, state, position, new_meta, force=True)
  manager.wait_until_finished()
  manager.close()
  before = training.count_params(params)
  after = training.count_params(new_params)
  summary = {"source": str(source), "target": str(target), "step": step, "init": init,
             "decay_steps": decay, "params_before": before, "params_after": after,
             "groups": {g: dataclasses.asdict(p) for g, p in plans.items()}}
  (target_path / "growth.json").write_text(json.dumps(summary, indent=1))
  return summary
