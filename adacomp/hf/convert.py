"""Reading Hugging Face safetensors and converting tensors to adacomp parameters and back.

`SafetensorsReader` opens a model directory's `model.safetensors`, or the shards its
`model.safetensors.index.json` lists (every shard checked present before anything is read), and
hands out one tensor at a time in float32 (no torch). `to_params` builds adacomp's params tree
one parameter at a time: the HF tensors of that parameter (one per layer for a stacked block
parameter) are read, converted, stacked and placed with the parameter's sharding before the
next is read, so the host holds one parameter, never the whole model. `from_params` is the
inverse for the export.
"""
import json
import math
import os
from typing import Callable, Optional

import jax
import numpy as np
from safetensors import safe_open

from adacomp.hf.families import Family, Weight

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class WeightError(ValueError):
  """A tensor that is missing from the checkpoint or has the wrong shape (the message names it)."""


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


class SafetensorsReader:
  """Tensors of a HF model directory by name, read lazily, one at a time, as float32."""

  def __init__(self, hf_dir: str, family: Optional[Family] = None):
    self.hf_dir = hf_dir
    self._family = family
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      missing = sorted({s for s in weight_map.values()
                        if not os.path.isfile(os.path.join(hf_dir, s))})
      if missing:
        count = sum(1 for s in weight_map.values() if s in missing)
        raise WeightError(
            f"{hf_dir} is a sharded checkpoint whose {INDEX} lists {', '.join(missing)}, which "
            f"is missing ({count} tensors live there); download every shard the index names "
            f"into {hf_dir}.")
      self._where = dict(weight_map)
    elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
      with safe_open(os.path.join(hf_dir, SINGLE), framework="np") as f:
        self._where = {k: SINGLE for k in f.keys()}
    else:
      found = sorted(n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth")))
      raise WeightError(
          f"{hf_dir} holds no {SINGLE} or {INDEX}"
          f"{' (only ' + ', '.join(found) + ': PyTorch pickles, not read)' if found else ''}; "
          f"save the model with save_pretrained(..., safe_serialization=True) or download its "
          f"safetensors files.")
    self._shapes = {}

  def names(self) -> set:
    return set(self._where)

  def resolve(self, name: str) -> Optional[str]:
    """The stored name of `name` (some saved checkpoints drop the family's prefix)."""
    if name in self._where:
      return name
    for prefix in self._family.prefixes if self._family else ():
      if name.startswith(prefix) and name[len(prefix):] in self._where:
        return name[len(prefix):]
    return None

  def shape(self, name: str) -> tuple:
    stored = self._stored(name)
    with safe_open(os.path.join(self.hf_dir, self._where[stored]), framework="np") as f:
      return tuple(f.get_slice(stored).get_shape())

  def _stored(self, name: str) -> str:
    stored = self.resolve(name)
    if stored is None:
      raise WeightError(f"Tensor {name!r} is missing from {self.hf_dir}; the checkpoint is "
                        f"incomplete or of another architecture than its config.json says. "
                        f"Re-download it or fix config.json.")
    return stored

  def read(self, name: str) -> np.ndarray:
    stored = self._stored(name)
    path = os.path.join(self.hf_dir, self._where[stored])
    try:
      with safe_open(path, framework="np") as f:
        return np.asarray(f.get_tensor(stored), np.float32)
    except TypeError:  # bfloat16 has no numpy dtype: read it through jax
      with safe_open(path, framework="flax") as f:
        return np.asarray(f.get_tensor(stored).astype(np.float32))

  def total_bytes(self) -> int:
    return sum(os.path.getsize(os.path.join(self.hf_dir, s)) for s in set(self._where.values()))


def _in_ndim(path: tuple) -> int:
  """adacomp's leading input axes: the attention output [heads, head_dim, d] has two."""
  return 2 if path[-1] == "out" and "attn" in path else 1


def hf_shape(weight: Weight, path: tuple, shape: tuple) -> tuple:
  """The HF tensor shape of one layer's adacomp parameter of `shape`."""
  if weight.shape:
    return weight.shape
  if weight.kind in ("linear", "conv1d"):
    k = _in_ndim(path)
    inp, out = math.prod(shape[:k]), math.prod(shape[k:])
    return (out, inp) if weight.kind == "linear" else (inp, out)
  if path[-1] == "embedding":
    return shape
  return (math.prod(shape),)


def _to_ours(weight: Weight, array: np.ndarray, shapes: list) -> list:
  if weight.kind == "linear":
    return [array.T.reshape(shapes[0])]
  if weight.kind == "patch":  # Conv2d [d, C, p, p] -> patchify's [(p p C), d]
    return [array.transpose(2, 3, 1, 0).reshape(shapes[0])]
  if weight.kind == "fused":
    parts = np.split(array, 3, axis=-1)
    return [p.reshape(s) for p, s in zip(parts, shapes)]
  return [array.reshape(shapes[0])]


def _to_hf(weight: Weight, arrays: list, paths: list) -> np.ndarray:
  if weight.kind == "fused":
    flat = [a.reshape(a.shape[0], -1) if a.ndim == 3 else a.reshape(-1) for a in arrays]
    return np.concatenate(flat, axis=-1)
  array, path = arrays[0], paths[0]
  target = hf_shape(weight, path, array.shape)
  if weight.kind == "linear":
    return array.reshape(target[::-1]).T
  return array.reshape(target)


def _layer_names(weight: Weight, layers: int, stacked: bool) -> list:
  return [weight.hf.format(i=i) for i in range(layers)] if stacked else [weight.hf]


def to_params(reader: SafetensorsReader, family: Family, fields: dict, abstract: dict,
              place: Callable[[tuple, np.ndarray], jax.Array]) -> dict:
  """adacomp's params tree from the reader's tensors; `abstract` gives each parameter's shape
  ([layers, ...] under "blocks"), `place(path, array)` puts one parameter on its devices."""
  params, done = {}, set()
  layers = fields["num_layers"]
  for weight in family.weights(fields):
    paths = weight.paths or (weight.path,)
    stacked = paths[0][0] == "blocks"
    try:
      shapes = [tuple(_get(abstract, p).shape) for p in paths]
    except KeyError as e:
      raise WeightError(f"adacomp's model has no parameter {'/'.join(paths[0])} for "
                        f"{weight.hf!r} ({e}); DecoderConfig does not match the family.") from e
    layer_shapes = [s[1:] for s in shapes] if stacked else shapes
    per_layer = [[] for _ in paths]
    for name in _layer_names(weight, layers, stacked):
      array = reader.read(name)
      if weight.kind == "fused":  # [d, 3 h hd] weight or [3 h hd] bias
        first = layer_shapes[0]
        expected = ((first[0], 3 * math.prod(first[1:])) if len(first) == 3 else
                    (3 * math.prod(first),))
      else:
        expected = hf_shape(weight, paths[0], layer_shapes[0])
      if tuple(array.shape) != tuple(expected):
        raise WeightError(
            f"Tensor {name!r} in {reader.hf_dir} has shape {tuple(array.shape)}, but config.json "
            f"implies {tuple(expected)} (adacomp's {'/'.join(paths[0])}); the weights and "
            f"config.json are of different models.")
      for out, value in zip(per_layer, _to_ours(weight, array, layer_shapes)):
        out.append(value)
      done.add(reader.resolve(name))
    for path, values in zip(paths, per_layer):
      value = np.stack(values) if stacked else values[0]
      _set(params, path, place(path, value))
  unused = sorted(n for n in reader.names() - done
                  if not any(n.endswith(s) for s in family.ignored))
  if unused:
    raise WeightError(
        f"{reader.hf_dir} holds tensors the {family.name} mapping does not read: "
        f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}; config.json does not "
        f"describe these weights (e.g. a bias it says is absent). Fix config.json.")
  missing = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]
             if not _has(params, p)]
  if missing:
    raise WeightError(f"No HF tensor maps to adacomp's {', '.join(missing)}; DecoderConfig "
                      f"does not match the {family.name} family.")
  return params


def _has(tree, keypath) -> bool:
  for k in keypath:
    key = getattr(k, "key", k)
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


def from_params(params: dict, family: Family, fields: dict) -> dict:
  """HF tensors {name: float32 array} of an adacomp params tree (the export)."""
  tensors = {}
  layers = fields["num_layers"]
  for weight in family.weights(fields):
    paths = weight.paths or (weight.path,)
    stacked = paths[0][0] == "blocks"
    values = [np.asarray(jax.device_get(_get(params, p)), np.float32) for p in paths]
    for i, name in enumerate(_layer_names(weight, layers, stacked)):
      arrays = [v[i] for v in values] if stacked else values
      tensors[name] = np.ascontiguousarray(_to_hf(weight, arrays, list(paths)))
  return tensors
