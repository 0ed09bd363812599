"""SkipDecode's position-wise exit schedule (Del Corro et al., 2023, arXiv 2307.02628).

Every token of a batch at sequence position t runs the same number of layers a_t, and a_t never
increases with t. A token runs the `warmup_layers` bottom layers, then skips to the top
a_t - warmup_layers layers, so the last layers (and the LM head's input distribution) are always
computed. Because the active sets are nested (a later position's set is inside an earlier one's),
every key/value a later token attends to at layer l was computed by the earlier token: no KV cache
entry is ever missing, and decoding never recomputes one.

    a_t = max_active                                              for t <  warmup_len
    a_t = max_active - (max_active - min_active) * (t - warmup_len) / (max_len - 1 - warmup_len)
          rounded to the nearest integer                          for t >= warmup_len

The paper decays over generated positions with the prompt at the full budget; `warmup_len` (the
prompt length, or longer) plays that role here. `warmup_layers` is the paper's warm-up layer
count (it found one always-computed bottom layer helps); it is 0 or more and at most min_active.
"""
from typing import Optional

import gin
import numpy as np


@gin.configurable
def linear_skip_schedule(max_len: int, num_layers: int, *, max_active: Optional[int] = None,
                         min_active: int = 1, warmup_len: int = 0,
                         warmup_layers: int = 1) -> np.ndarray:
  """Active-layer count for every position 0..max_len-1: int32 [max_len], non-increasing."""
  max_active = num_layers if max_active is None else max_active
  if not 1 <= min_active <= max_active <= num_layers:
    raise ValueError(f"linear_skip_schedule needs 1 <= min_active ({min_active}) <= max_active "
                     f"({max_active}) <= num_layers ({num_layers}).")
  if not 0 <= warmup_layers <= min_active:
    raise ValueError(f"linear_skip_schedule: warmup_layers={warmup_layers} must lie in "
                     f"[0, min_active={min_active}].")
  t = np.arange(max_len, dtype=np.float64)
  span = max(max_len - 1 - warmup_len, 1)
  frac = np.clip((t - warmup_len) / span, 0.0, 1.0)
  active = np.rint(max_active - (max_active - min_active) * frac).astype(np.int32)
  return active


def full_schedule(max_len: int, num_layers: int) -> np.ndarray:
  """Every layer at every position: the dense model."""
  return np.full((max_len,), num_layers, np.int32)


def active_layer_mask(active: np.ndarray, num_layers: int, warmup_layers: int = 1) -> np.ndarray:
  """Bool [num_layers, len(active)]: layer l runs at position t.

  Layers [0, warmup_layers) always run; the rest of a_t's budget goes to the top layers.
  """
  active = np.asarray(active)
  layer = np.arange(num_layers)[:, None]
  top = num_layers - (active[None, :] - warmup_layers)
  return (layer < min(warmup_layers, num_layers)) | (layer >= top)


@gin.configurable
def schedule_for_speedup(max_len: int, num_layers: int, *, speedup: float = gin.REQUIRED,
                         warmup_len: int = 0, warmup_layers: int = 1,
                         max_active: Optional[int] = None) -> np.ndarray:
  """The linear schedule whose mean active-layer count over positions >= warmup_len is closest
  to num_layers / speedup (the FLOP-ratio target), searching max_active and min_active.

  Ties go to the schedule found first: the smallest min_active, then the smallest max_active.
  """
  if speedup < 1.0:
    raise ValueError(f"schedule_for_speedup.speedup={speedup} must be at least 1.")
  target = num_layers / speedup
  best, best_err = None, None
  hi = num_layers if max_active is None else max_active
  for min_active in range(max(warmup_layers, 1), hi + 1):
    for top in range(min_active, hi + 1):
      sched = linear_skip_schedule(max_len, num_layers, max_active=top, min_active=min_active,
                                   warmup_len=warmup_len, warmup_layers=warmup_layers)
      # The prompt (positions < warmup_len) always runs every layer.
      sched[:warmup_len] = num_layers
      err = abs(sched[warmup_len:].mean() - target)
      if best_err is None or err < best_err - 1e-9:
        best, best_err = sched, err
  return best


def mean_speedup(active: np.ndarray, num_layers: int, start: int = 0) -> float:
  """The FLOP-ratio ideal: total layers / mean active layers over positions >= start."""
  return float(num_layers / np.mean(np.asarray(active)[start:]))


@gin.configurable
def layer_mask_for_training(seq_len: int, num_layers: int, schedule=None,
                            warmup_layers: int = 1) -> Optional[np.ndarray]:
  """Bool [num_layers, seq_len] for fine-tuning and evaluating under a schedule, or None.

  The shared language-model task calls it through its hook (configs/skipdecode.gin):
      position_layer_mask.fn = @layer_mask_for_training
      layer_mask_for_training.schedule = @schedule_for_speedup
  Each training position then runs only its scheduled layers (the rest are masked to the
  identity, as the paper's fine-tuning does), so the model learns to work without them.
  """
  if schedule is None:
    return None
  active = schedule(seq_len, num_layers)
  return active_layer_mask(active, num_layers, warmup_layers)
