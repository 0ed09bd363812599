r"""Throughput of a dense ViT against AS-ViT checkpoints: images/s at batch 1 and 64, top-1.

  python scripts/bench_vit.py --dense=/tmp/adacomp/vit/dense \
      --pruned=/tmp/adacomp/vit/as_0.65 --pruned=/tmp/adacomp/vit/as_0.5

For each pruned checkpoint:
  1. The exact model (hard per-image thresholds, every token computed, masked) on the evaluation
     split gives top-1, the compute fraction (MACs over the dense ViT's) and the mean kept image
     tokens per stage.
  2. Static packing keeps k_s = floor(total kept at stage s / number of images) tokens per
     image with the total taken over the whole split, so one static shape serves every batch;
     of those, tokens under the threshold stay masked. Its top-1 is measured too.
  3. Per-batch k (`adacomp.models.vit.batch_k_apply`, the released code's rule): per batch and
     stage k_s = floor(total kept in the batch / B), every image keeps its top k_s tokens,
     arrays padded to k_s rounded up to a multiple of 8. Top-1 on the split's batches of 64,
     and the mean k per stage over them.
  4. The packed functions and the dense one are timed round-robin in one process (variants
     alternate within every repetition, so CPU contention hits all alike), batch 1 and 64;
     images/s is batch / median seconds per call (the per-batch-k call includes its host
     round trip per stage, as the released code's `.item()` does). The XLA cost analysis of
     each compiled static-capacity function gives the FLOP ratio and its ideal speed-up.
Prints a table and writes JSON (--output).
"""
import json
import statistics
import sys
import time

from absl import flags

from adacomp import cli

flags.DEFINE_string("dense", None, "Workdir of the dense ViT run.")
flags.DEFINE_multi_string("pruned", [], "Workdirs of AS-ViT runs.")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes to time.")
flags.DEFINE_string("split", "validation", "Split for top-1 and calibration.")
flags.DEFINE_integer("repeats", 15, "Round-robin repetitions (medians are reported).")
flags.DEFINE_float("min_seconds", 0.2, "Minimum time per variant per repetition.")
flags.DEFINE_string("output", "/tmp/adacomp/vit/bench_vit.json", "JSON report path.")
flags.mark_flag_as_required("dense")
FLAGS = flags.FLAGS


def _load(workdir):
  """(model, params, summary of the exact model, dataset) of a checkpoint, from its own gin."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from adacomp import gin_utils, sharding, tasks  # pylint: disable=g-import-not-at-top
  from adacomp.methods import registry  # pylint: disable=g-import-not-at-top,unused-import
  from adacomp.models.build import restore_sharded  # pylint: disable=g-import-not-at-top
  from adacomp.training import make_eval_step  # pylint: disable=g-import-not-at-top
  step, _ = gin_utils.parse_checkpoint_config(workdir)
  task = tasks.make_task("image_classification")
  data = task.dataset(FLAGS.split, batch_size=64, train=False)
  model = task.build_model(data)
  mesh, rules = sharding.make_mesh(), sharding.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = restore_sharded(workdir, model, task.init_inputs(1), mesh, rules, step)
    summary = task.evaluate(jax.jit(make_eval_step(model, task=task)), params, data,
                            lambda b: sharding.global_batch(b, mesh))
  return model, params, summary, data


def _accuracy(fn, params, data):
  import numpy as np  # pylint: disable=g-import-not-at-top
  correct = total = 0.0
  for batch in data:
    pred = np.argmax(np.asarray(fn(params, batch["inputs"])), -1)
    correct += float(np.sum((pred == batch["targets"]) * batch["weights"]))
    total += float(np.sum(batch["weights"]))
  return correct / total


def _batch_k(model, params, data):
  """(top-1, mean k per stage) of per-batch-k inference over the evaluation batches."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from adacomp.models.vit import batch_k_apply  # pylint: disable=g-import-not-at-top
  correct = total = 0.0
  ks = []
  for batch in data:
    logits, k = batch_k_apply(model, params, batch["inputs"], weights=batch["weights"])
    pred = np.argmax(np.asarray(logits), -1)
    correct += float(np.sum((pred == batch["targets"]) * batch["weights"]))
    total += float(np.sum(batch["weights"]))
    ks.append(k)
  return correct / total, [float(np.mean(col)) for col in zip(*ks)]


def _flops(fn, params, x):
  cost = fn.lower(params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def main():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from adacomp.models.vit import batch_k_apply  # pylint: disable=g-import-not-at-top

  variants = []  # name, fn, params, info
  model, params, summary, data = _load(FLAGS.dense)
  dense_fn = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x))
  variants.append(("dense", dense_fn, params, {
      "workdir": FLAGS.dense, "top1": summary["accuracy"], "top1_packed": summary["accuracy"],
      "compute_fraction": summary["compute_fraction"], "capacity": None}))
  n_img = model.config.num_patches
  for workdir in FLAGS.pruned:
    model, params, summary, data = _load(workdir)
    kept = [summary[k] for k in sorted(summary) if k.startswith("kept_stage")]
    if not kept:
      raise ValueError(f"{workdir} has no pruning stages (ViTConfig.prune_after); pass "
                           f"AS-ViT runs to --pruned.")
    capacity = tuple(max(1, int(np.floor(k * n_img))) for k in kept)
    fn = jax.jit(lambda p, x, m=model, c=capacity: m.apply({"params": p}, x, capacity=c))
    name = f"AS-ViT rho={model.config.budget_ratio:g}"
    top1_k, mean_k = _batch_k(model, params, data)
    info = {"workdir": workdir, "top1": summary["accuracy"],
            "top1_packed": _accuracy(fn, params, data), "top1_batch_k": top1_k,
            "mean_batch_k": mean_k, "compute_fraction": summary["compute_fraction"],
            "kept_per_stage": kept, "capacity": capacity}
    variants.append((name, fn, params, info))
    variants.append((name + " batch k",
                     lambda p, x, m=model: batch_k_apply(m, p, x)[0], params, dict(info)))
    print(f"{name}: kept {['%.3f' % k for k in kept]} -> capacity {capacity}; per-batch k "
          f"{['%.1f' % k for k in mean_k]}, top-1 {top1_k:.4f}", flush=True)

  images = np.concatenate([b["inputs"][b["weights"] > 0] for b in data])
  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  inputs = {b: jax.device_put(images[:b]) for b in batch_sizes}
  dense_flops = _flops(variants[0][1], variants[0][2], inputs[max(batch_sizes)])
  for name, fn, p, info in variants:
    if not name.endswith("batch k"):
      info["flop_ratio"] = _flops(fn, p, inputs[max(batch_sizes)]) / dense_flops
      info["ideal_speedup"] = 1.0 / info["flop_ratio"]
    for b in batch_sizes:
      jax.block_until_ready(fn(p, inputs[b]))  # compile and warm up

  times = {(name, b): [] for name, *_ in variants for b in batch_sizes}
  for rep in range(FLAGS.repeats):
    for b in batch_sizes:
      for name, fn, p, _ in variants:
        calls, start = 0, time.perf_counter()
        while True:
          jax.block_until_ready(fn(p, inputs[b]))
          calls += 1
          elapsed = time.perf_counter() - start
          if elapsed >= FLAGS.min_seconds:
            break
        times[(name, b)].append(elapsed / calls)
    print(f"  repetition {rep + 1}/{FLAGS.repeats}", flush=True)

  rows = []
  for name, _, _, info in variants:
    row = {"variant": name, **{k: v for k, v in info.items()
                               if not (name.endswith("batch k") and k == "capacity")}}
    for b in batch_sizes:
      row[f"images_per_s_b{b}"] = b / statistics.median(times[(name, b)])
      row[f"speedup_b{b}"] = row[f"images_per_s_b{b}"] / (
          b / statistics.median(times[("dense", b)]))
    rows.append(row)

  head = ("| model | top-1 (exact) | top-1 (static packed / per-batch k) | compute fraction | "
          "FLOP ratio (ideal speed-up) | " +
          " | ".join(f"images/s batch {b} (speed-up)" for b in batch_sizes) + " |")
  print("\n" + head + "\n|" + "---|" * (5 + len(batch_sizes)))
  for r in rows:
    flop = (f"{r['flop_ratio']:.3f} ({r['ideal_speedup']:.2f}x)" if "flop_ratio" in r
            else "—")
    print(f"| {r['variant']} | {r['top1']:.4f} | {r['top1_packed']:.4f} / "
          f"{r.get('top1_batch_k', r['top1_packed']):.4f} | "
          f"{r['compute_fraction']:.3f} | {flop} | " +
          " | ".join(f"{r[f'images_per_s_b{b}']:,.0f} ({r[f'speedup_b{b}']:.2f}x)"
                     for b in batch_sizes) + " |", flush=True)
  report = {"split": FLAGS.split, "repeats": FLAGS.repeats, "device": str(jax.devices()[0]),
            "rows": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
                     for r in rows]}
  with open(FLAGS.output, "w") as f:
    json.dump(report, f, indent=2)
  print(f"\nReport: {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
