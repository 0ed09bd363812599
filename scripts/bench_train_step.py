r"""Training-step cost of each method against its dense baseline, per FLOP (a benchmark).

  python scripts/bench_train_step.py                     # every method config, 2 rounds
  python scripts/bench_train_step.py --methods="dense,duo stage 1 (random routes; sorted)" \
      --steps=40 --rounds=3

Each method's config trains `--steps` steps from a fresh init (checkpoints it would start from
are not needed for timing) through the real `train()` on the embedded corpus, in rounds: every
method once per round, so load on the machine affects all alike. From each run's metrics.jsonl
it takes the step time (ms, median over the logged windows after the first) and the FLOPs of
one compiled step as XLA counts them. Columns:

  ms/step     median step time over rounds
  t/dense     step time over the dense baseline's (same depth)
  FLOPs/dense XLA's FLOPs per step over the dense baseline's
  overhead    (t/dense) / (FLOPs/dense): time per FLOP relative to dense; 1.0 means the method
              costs exactly its extra arithmetic, above 1 it pays for routing, gathers, masks.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

# label -> (gin files, bindings, dense baseline label)
METHODS = {
    "dense": (["configs/dense.gin"], [], "dense"),
    "duo stage 1 (random routes; sorted)": (["configs/duo.gin"], [], "dense"),
    "duo stage 1 (random routes; masked)": (["configs/duo.gin"],
                                            ["duo_ffn.compute = 'masked'"], "dense"),
    "duo router stage": (["configs/duo_router.gin"], ["train.init_checkpoint = None"], "dense"),
    "dense 12 layers": (["configs/dense.gin", "configs/sizes/tiny_deep.gin"], [],
                        "dense 12 layers"),
    "skipdecode 2x (12 layers)": (["configs/skipdecode.gin"], ["train.init_checkpoint = None"],
                                  "dense 12 layers"),
    "duo + skipdecode 2x": (["configs/duo_skipdecode.gin"], ["train.init_checkpoint = None"],
                            "dense"),
    "tokenformer": (["configs/tokenformer.gin"], [], "dense"),
    "informed routing: forecasters": (["configs/informed_routing_lff.gin"],
                                      ["train.init_checkpoint = None"], "dense"),
    "informed routing: router": (["configs/informed_routing.gin"],
                                 ["train.init_checkpoint = None"], "dense"),
    "mod (greedy)": (["configs/mod.gin"], ["train.init_checkpoint = None"], "dense"),
    "vit (dense)": (["configs/vit.gin"], [], "vit (dense)"),
    "as-vit": (["configs/as_vit.gin"], ["train.init_checkpoint = None"], "vit (dense)"),
}


def run_once(label, steps, workdir):
  import gin  # pylint: disable=g-import-not-at-top
  from adacomp import gin_utils, training  # pylint: disable=g-import-not-at-top
  from adacomp.methods import registry  # pylint: disable=g-import-not-at-top,unused-import
  files, bindings, _ = METHODS[label]
  gin.clear_config()
  gin_utils.parse(files, bindings + [f"train.num_steps = {steps}", "train.eval_every = 0",
                                     "train.log_every = 10", "make_manager.save_every = 100000",
                                     "train.eval_batches = 1",
                                     f"make_optimizer.decay_steps = {steps}"], finalize=False)
  training.train(workdir)
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if r["split"] == "train" and r.get("step_ms")]
  windows = train[1:] or train  # the first window holds the first steps' warm-up
  ms = statistics.median(r["step_ms"] for r in windows)
  flops = None
  if windows[0].get("tflops_per_s"):
    flops = windows[0]["tflops_per_s"] * 1e12 * windows[0]["step_ms"] / 1000
  return ms, flops


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated labels from: {', '.join(METHODS)}")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--json", default=None)
  a = parser.parse_args(argv)
  labels = [m.strip() for m in a.methods.split(",") if m.strip()]
  unknown = [m for m in labels if m not in METHODS]
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
  for label in labels:  # baselines come along
    if METHODS[label][2] not in labels:
      labels.append(METHODS[label][2])
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  times = {label: [] for label in labels}
  flops = {}
  root = tempfile.mkdtemp(prefix="bench_train_step_")
  try:
    for r in range(a.rounds):
      for label in labels:
        print(f"round {r + 1}/{a.rounds}: {label}", file=sys.stderr, flush=True)
        workdir = os.path.join(root, f"{r}_{abs(hash(label))}")
        ms, fl = run_once(label, a.steps, workdir)
        times[label].append(ms)
        flops[label] = fl
        shutil.rmtree(workdir, ignore_errors=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  rows = []
  for label in labels:
    base = METHODS[label][2]
    ms, base_ms = statistics.median(times[label]), statistics.median(times[base])
    fr = (flops[label] / flops[base]) if flops.get(label) and flops.get(base) else None
    rows.append({"method": label, "baseline": base, "ms_per_step": ms,
                 "t_rel": ms / base_ms, "flops_rel": fr,
                 "overhead": (ms / base_ms) / fr if fr else None})
  print("| method | baseline | ms/step | t / dense | FLOPs / dense | overhead per FLOP |")
  print("|---|---|---:|---:|---:|---:|")
  for row in rows:
    fr = "-" if row["flops_rel"] is None else f"{row['flops_rel']:.2f}"
    ov = "-" if row["overhead"] is None else f"{row['overhead']:.2f}"
    print(f"| {row['method']} | {row['baseline']} | {row['ms_per_step']:.1f} | "
          f"{row['t_rel']:.2f} | {fr} | {ov} |")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
