"""Quality against compute and against inference time, for checkpoints of any method.

An entry is a checkpoint plus optional gin bindings applied over its saved config (a routing
mode, a budget, a capacity), written `label=DIR` or `label=DIR;binding;binding`; a part
`ref=LABEL` makes another entry its dense reference (a 12-layer SkipDecode model against the
12-layer dense one). Every entry is
evaluated by the same `evaluation.evaluate_checkpoint` on the same split and number of batches, so
the figures are comparable:

  * quality: bits per byte (language models) or top-1 (image classifiers);
  * compute: MACs per token (per image) from the layers' own sown `macs`, relative to the
    entry's reference: its `ref=` entry, else the task's entry flagged `reference`, else the
    first entry of the task; 1.0 for the dense model by construction;
  * time: the inference path of the entry, relative to the reference's, timed round-robin across
    entries (`rounds` interleaved rounds, medians) so load on the machine hits all alike.
    Language models: one jitted forward pass over a validation batch with the entry's bindings
    (Duo's gather path, capacity routing), except entries evaluated under a SkipDecode layer
    mask, whose saving exists only in generation: those are timed generating (prompt
    `prompt_len` + the rest of the sequence) with their schedule against the same params
    generating through every layer, and that ratio is reported.

    Image classifiers: the packed-inference speed-up at batch 64 that `scripts/bench_vit.py`
    measured (its JSON, `image_bench`), matched by checkpoint directory; without it, none.

`run_pareto` writes pareto.json and pareto.png (two panels: quality vs compute, quality vs time).
"""
import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from adacomp import gin_utils


@dataclasses.dataclass(frozen=True)
class Entry:
  label: str
  checkpoint_dir: str
  bindings: tuple = ()
  reference: bool = False
  ref: Optional[str] = None  # label of this entry's own reference


def parse_entry(spec: str, reference: bool = False) -> Entry:
  """'label=DIR' or 'label=DIR;binding;binding' -> Entry."""
  if "=" not in spec:
    raise ValueError(f"Entry {spec!r} must read label=CHECKPOINT_DIR[;gin binding;...], e.g. "
                     f"\"duo small=/tmp/adacomp/duo;duo_ffn.mode='small'\".")
  label, rest = spec.split("=", 1)
  parts = [p.strip() for p in rest.split(";") if p.strip()]
  if not parts:
    raise ValueError(f"Entry {spec!r} names no checkpoint directory after '='.")
  refs = [p[len("ref="):].strip() for p in parts[1:] if p.startswith("ref=")]
  bindings = tuple(p for p in parts[1:] if not p.startswith("ref="))
  return Entry(label.strip(), parts[0], bindings, reference, refs[-1] if refs else None)


# Routed units (informed routing, MoD) decide causally, as when generating; an entry's own
# bindings come after and may ask for the teacher-forced top-k (its label then says so).
CAUSAL_ROUTING = ("routed_ffn.decision = 'causal'", "routed_attention.decision = 'causal'")


def configure(entry: Entry, step: Optional[int] = None):
  """Parses the entry's saved gin config plus the causal routing decisions and its bindings;
  returns (step, meta)."""
  return gin_utils.parse_checkpoint_config(entry.checkpoint_dir, step,
                                          gin_bindings=list(CAUSAL_ROUTING + entry.bindings))


def _task_of(meta) -> str:
  return meta.get("task", "lm")


def evaluate_entry(entry: Entry, split: str, eval_batches: Optional[int], output_dir: str
                   ) -> dict:
  from adacomp import evaluation  # pylint: disable=g-import-not-at-top
  step, meta = configure(entry)
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry.label)
  with gin.unlock_config():
    report = evaluation.evaluate_checkpoint(
        entry.checkpoint_dir, meta, step, split=split, eval_batches=eval_batches,
        output=os.path.join(output_dir, "evals", f"{safe}.json"))
  report["task"] = _task_of(meta)
  return report


def _lm_timer(entry: Entry, batch_size: int, prompt_len: int):
  """(fn, args, kind) timing the entry's inference path; kind 'forward' or 'generate'."""
  from adacomp import data as data_lib  # pylint: disable=g-import-not-at-top
  from adacomp import decoding, tasks  # pylint: disable=g-import-not-at-top
  from adacomp.models.build import load_decoder  # pylint: disable=g-import-not-at-top
  step, meta = configure(entry)
  seq_len = meta["seq_len"]
  model, params = load_decoder(entry.checkpoint_dir, meta, step)
  data = data_lib.lm_dataset("validation", batch_size=batch_size, seq_len=seq_len, train=False,
                             eval_max_batches=1)
  inputs = jnp.asarray(next(iter(data))["inputs"])
  schedule_mask = tasks.position_layer_mask(seq_len, model.config.num_layers)
  if schedule_mask is None:
    fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    return {"entry": (fn, (params, inputs))}, "forward"
  # SkipDecode: active layers per position, read back from the mask (warm-up rows included).
  mask = np.asarray(schedule_mask, bool)
  active = mask.sum(axis=0).astype(np.int32)
  # The always-on bottom layers: the leading run of active layers at the least active position.
  last = mask[:, int(np.argmin(active))]
  warmup = int(np.argmin(last)) if not last.all() else 1
  decoder = decoding.Decoder(model.config, warmup_layers=warmup)
  full = np.full((seq_len,), model.config.num_layers, np.int32)  # every layer: dense
  prompt = inputs[:, :prompt_len]
  new = seq_len - prompt_len

  def gen(p, prompt, schedule):
    return decoding.generate(decoder, p, prompt, schedule, jax.random.key(0),
                             max_new_tokens=new)

  fn = jax.jit(gen)
  return {"entry": (fn, (params, prompt, jnp.asarray(active))),
          "full": (fn, (params, prompt, jnp.asarray(full)))}, "generate"


def time_round_robin(fns: dict, rounds: int, warmup: int = 2,
                     progress: Optional[Callable[[int, int], None]] = None) -> dict:
  """Median ms of each (fn, args) in `fns`, interleaved across names."""
  for fn, args in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for r in range(rounds):
    for name, (fn, args) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(1000 * (time.perf_counter() - start))
    if progress is not None:
      progress(r + 1, rounds)
  return {name: statistics.median(v) for name, v in times.items()}


def run_pareto(entries: Sequence[Entry], output_dir: str, *, split: str = "validation",
               eval_batches: Optional[int] = 8, rounds: int = 10, batch_size: int = 8,
               prompt_len: int = 32, image_bench: Optional[str] = None, plots: bool = True,
               verbose: bool = True) -> dict:
  """Evaluates and times every entry; writes pareto.json (+ pareto.png). Returns the table."""
  from adacomp.metrics import ProgressBar  # pylint: disable=g-import-not-at-top
  say = print if verbose else (lambda *a, **k: None)
  if not entries:
    raise ValueError("No entries: pass at least the dense reference, e.g. "
                     "--entry dense=/tmp/adacomp/dense.")
  labels = [e.label for e in entries]
  if len(set(labels)) != len(labels):
    raise ValueError(f"Entry labels must be unique; got {labels}.")
  os.makedirs(os.path.join(output_dir, "evals"), exist_ok=True)
  rows = []
  bar = ProgressBar("entries evaluated") if verbose else None
  for i, entry in enumerate(entries):
    report = evaluate_entry(entry, split, eval_batches, output_dir)
    rows.append({"label": entry.label, "checkpoint_dir": entry.checkpoint_dir,
                 "bindings": list(entry.bindings), "task": report["task"], "report": report,
                 **({"routing": report["routing"]} if "routing" in report else {})})
    if bar:
      bar(i + 1, len(entries))

  references = {}
  for entry, row in zip(entries, rows):
    if entry.reference:
      if row["task"] in references:
        raise ValueError(f"Two reference entries for task {row['task']!r}: "
                         f"{references[row['task']]} and {entry.label}; flag one.")
      references[row["task"]] = row["label"]
  for row in rows:
    references.setdefault(row["task"], row["label"])
  by_label = {r["label"]: r for r in rows}
  for entry, row in zip(entries, rows):
    if entry.ref is not None and entry.ref not in by_label:
      raise ValueError(f"Entry {entry.label!r} names ref={entry.ref!r}, which is not an entry "
                       f"label; labels: {labels}.")
    if entry.ref is not None and by_label[entry.ref]["task"] != row["task"]:
      raise ValueError(f"Entry {entry.label!r} and its ref {entry.ref!r} are different tasks.")
    row["reference"] = entry.ref or references[row["task"]]
    row["reference_dir"] = by_label[row["reference"]]["checkpoint_dir"]
  for row in rows:
    ref = by_label[row["reference"]]["report"]
    rep = row["report"]
    if row["task"] == "lm":
      row["quality"], row["quality_name"] = rep["bits_per_byte"], "bits per byte"
      row["compute"] = rep["macs_per_token"] / ref["macs_per_token"]
    else:
      row["quality"], row["quality_name"] = rep["accuracy"], "top-1"
      row["compute"] = rep["macs_per_image"] / ref["macs_per_image"]

  # Timing: every LM entry's inference path, interleaved.
  timers, kinds = {}, {}
  for entry, row in zip(entries, rows):
    if row["task"] != "lm":
      continue
    fns, kind = _lm_timer(entry, batch_size, prompt_len)
    kinds[entry.label] = kind
    for name, fn in fns.items():
      timers[(entry.label, name)] = fn
  say(f"Timing {len(timers)} inference paths, {rounds} interleaved rounds")
  ms = time_round_robin(timers, rounds, progress=ProgressBar("timing rounds") if verbose
                        else None) if timers else {}
  speedups = {}
  if image_bench:
    with open(image_bench) as f:
      speedups = {os.path.normpath(r["workdir"]): r.get("speedup_b64")
                  for r in json.load(f)["rows"]}
  for row in rows:
    if row["task"] != "lm":
      s, ref = (speedups.get(os.path.normpath(row[k])) for k in
                ("checkpoint_dir", "reference_dir"))
      row["time"] = (ref / s) if s and ref else None
      row["timing"] = "packed, batch 64 (bench_vit)" if row["time"] else "not timed"
      continue
    label = row["label"]
    row["timing"] = kinds[label]
    row["ms"] = ms[(label, "entry")]
    if kinds[label] == "generate":
      row["time"] = ms[(label, "entry")] / ms[(label, "full")]
    else:
      row["time"] = ms[(label, "entry")] / ms[(row["reference"], "entry")]
  table = [{k: r[k] for k in ("label", "task", "reference", "quality", "quality_name",
                               "compute", "time", "timing", "checkpoint_dir", "bindings",
                               "routing") if k in r}
           for r in rows]
  result = {"split": split, "eval_batches": eval_batches, "rounds": rounds,
            "device": jax.devices()[0].device_kind, "rows": table}
  with open(os.path.join(output_dir, "pareto.json"), "w") as f:
    json.dump(result, f, indent=2)
  if plots:
    plot(result, os.path.join(output_dir, "pareto.png"))
  say(format_table(result))
  return result


def format_table(result: dict) -> str:
  lines = ["| entry | quality | compute vs its dense reference | time vs its dense reference "
           "| timed as |", "|---|---:|---:|---:|---|"]
  for r in result["rows"]:
    t = "-" if r["time"] is None else f"{r['time']:.2f}"
    # A routed entry evaluated with the per-sequence top-k is not reachable when generating.
    note = " (top-k, not causal)" if r.get("routing") == "topk" else ""
    if r.get("reference") not in (None, r["label"]):
      note += f" (vs {r['reference']})"
    lines.append(f"| {r['label']}{note} | {r['quality']:.3f} {r['quality_name']} | "
                 f"{r['compute']:.3f} | {t} | {r['timing']} |")
  return "\n".join(lines)


def family(label: str) -> str:
  """The method family of an entry, for colours: the label's first word ("Duo router" -> Duo)."""
  return label.split()[0] if label.split() else label


def plot(result: dict, path: str) -> None:
  """One row per task: quality against compute and against time, one colour per family."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = sorted({r["task"] for r in result["rows"]}, key=lambda t: (t != "lm", t))
  families = sorted({family(r["label"]) for r in result["rows"]})
  colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
  markers = "osD^v<>Ph*X"
  fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 5.2 * len(tasks)), squeeze=False)
  for ti, task in enumerate(tasks):
    rows = [r for r in result["rows"] if r["task"] == task]
    for ci, (key, xlabel) in enumerate((
        ("compute", "MACs per token (image) relative to the entry's dense reference"),
        ("time", "inference time relative to the entry's dense reference"))):
      ax = axes[ti, ci]
      for fi, fam in enumerate(sorted({family(r["label"]) for r in rows})):
        pts = sorted((r[key], r["quality"], r["label"]) for r in rows
                     if family(r["label"]) == fam and r[key] is not None)
        if not pts:
          continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=colours[fam], alpha=0.35)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], markers[fi % len(markers)],
                color=colours[fam], label=fam, markersize=6)
        for x, y, label in pts:
          ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6,
                      color=colours[fam])
      ax.set_xlabel(xlabel, fontsize=8)
      ax.set_ylabel(rows[0]["quality_name"] + (" (lower is better)" if task == "lm" else ""))
      ax.grid(alpha=0.3)
      ax.set_title(f"{'language modelling' if task == 'lm' else task}: quality vs {key}")
      ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
