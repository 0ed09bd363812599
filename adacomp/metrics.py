"""Metric sinks: a progress line on stdout, `metrics.jsonl`, and TensorBoard event files.

Only process 0 writes files; every process may print. TensorBoard files come from tensorboardX,
so no TensorFlow is needed.
"""
import json
import math
import sys
import time
from typing import Optional

import jax
import tqdm
from etils import epath


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def say(message: str) -> None:
  """A line of the training log, printed by process 0 only (every process runs the same loop)."""
  if jax.process_index() == 0:
    print(message, file=sys.stdout, flush=True)


class ProgressBar:
  """A tqdm bar driven by `bar(done, total)` calls (total None: unknown); closes at the end.

  In a terminal it redraws in place; in a log (not a tty) it writes a line at most every 5 s.
  """

  def __init__(self, label: str, stream=sys.stdout):
    self.label, self.stream = label, stream
    self.tty = getattr(stream, "isatty", lambda: False)()
    self._bar = None

  def __call__(self, done: int, total: Optional[int]) -> None:
    if self._bar is None:
      self._bar = tqdm.tqdm(total=total, desc=self.label, file=self.stream, leave=True,
                            mininterval=0.1 if self.tty else 5.0, dynamic_ncols=self.tty)
    self._bar.update(done - self._bar.n)
    if total is not None and done >= total:
      self.close()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class MetricWriter:
  """Writes scalars to JSONL and TensorBoard; `progress` prints the one-line training status."""

  def __init__(self, workdir: Optional[str], total_steps: int):
    self.total_steps = total_steps
    self._start = time.time()
    self._jsonl = None
    self._tb = None
    if workdir is not None and jax.process_index() == 0:
      path = epath.Path(workdir)
      self._jsonl = open(path / "metrics.jsonl", "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(path / "tensorboard"))

  def write(self, step: int, split: str, scalars: dict) -> None:
    if self._jsonl is not None:
      record = {"step": step, "split": split,
                **{k: (None if not math.isfinite(v) else v) for k, v in scalars.items()}}
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{split}/{k}", v, step)
      self._tb.flush()

  def progress(self, step: int, scalars: dict, start_step: int) -> None:
    elapsed = time.time() - self._start
    done = max(step - start_step, 1)
    eta = elapsed / done * (self.total_steps - step)
    frac = step / max(self.total_steps, 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    parts = [f"[{bar}] step {step}/{self.total_steps}"]
    for key, fmt in (("loss", "{:.4f}"), ("bits_per_byte", "bpb {:.3f}"),
                     ("accuracy", "acc {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                     ("images_per_s", "{:,.0f} img/s"), ("step_ms", "{:.1f} ms/step"),
                     ("tflops_per_s", "{:.3g} TFLOP/s"), ("mfu", "MFU {:.1%}")):
      if key in scalars and scalars[key] is not None:
        parts.append(("loss {:.4f}" if key == "loss" else fmt).format(scalars[key]))
    parts.append(f"eta {_format_duration(eta)}")
    say(" | ".join(parts))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
