r"""Plots validation bits/byte against step for TokenFormer growth runs and their baselines.

  python scripts/plot_growth.py \
      --run='small -> grown (TokenFormer):/tmp/adacomp/tokenformer/small,/tmp/adacomp/tokenformer/grown' \
      --run='large TokenFormer from scratch:/tmp/adacomp/tokenformer/large' \
      --run='dense Transformer, same params:/tmp/adacomp/tokenformer/dense_matched' \
      --growth_step=300 --output=docs/figures/tokenformer_growth.png

Each --run is LABEL:WORKDIR[,WORKDIR...]; several workdirs are joined in order (a source run,
then the run grown from it: the later workdir's records win from its first step on). Reads each
workdir's metrics.jsonl; writes the PNG and a JSON of the plotted points beside it.
"""
import json
import os

from absl import flags

from adacomp import cli

flags.DEFINE_multi_string("run", [], "LABEL:WORKDIR[,WORKDIR...] (repeatable).")
flags.DEFINE_integer("growth_step", None, "Step at which the grown run was grown (marked).")
flags.DEFINE_string("output", "docs/figures/tokenformer_growth.png", "PNG path.")
flags.DEFINE_float("ymax", None, "Upper y limit (early, high points are then cut off).")
flags.DEFINE_string("title", "TokenFormer growth on the embedded corpus", "Figure title.")
FLAGS = flags.FLAGS


def validation_curve(workdirs):
  """{step: bits_per_byte} of the validation records, later workdirs overriding earlier ones
  from their first step on."""
  curve = {}
  for workdir in workdirs:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: is {workdir} a training --workdir?")
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    points = {r["step"]: r["bits_per_byte"] for r in records if r.get("split") == "validation"}
    if points:
      first = min(points)
      curve = {s: v for s, v in curve.items() if s < first}
      curve.update(points)
  return dict(sorted(curve.items()))


def main():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not FLAGS.run:
    raise ValueError("Give at least one --run=LABEL:WORKDIR[,WORKDIR...].")
  curves = {}
  for spec in FLAGS.run:
    label, _, dirs = spec.rpartition(":")
    if not label or not dirs:
      raise ValueError(f"--run={spec!r}: expected LABEL:WORKDIR[,WORKDIR...].")
    curves[label] = validation_curve(dirs.split(","))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, curve in curves.items():
    ax.plot(list(curve), list(curve.values()), marker="o", label=label)
  if FLAGS.growth_step is not None:
    ax.axvline(FLAGS.growth_step, color="gray", linestyle="--", label="growth (2x tokens)")
  if FLAGS.ymax is not None:
    ax.set_ylim(top=FLAGS.ymax)
  ax.set_xlabel("training step")
  ax.set_ylabel("validation bits/byte (32 batches)")
  ax.set_title(FLAGS.title)
  ax.grid(alpha=0.3)
  ax.legend()
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(FLAGS.output, dpi=120)
  data_path = os.path.splitext(FLAGS.output)[0] + ".json"
  with open(data_path, "w") as f:
    json.dump({"growth_step": FLAGS.growth_step, "curves": curves}, f, indent=1)
  width = max(len(label) for label in curves)
  print(f"{'run':<{width}} {'last step':>9} {'bits/byte':>9}")
  for label, curve in curves.items():
    step = max(curve)
    print(f"{label:<{width}} {step:>9} {curve[step]:>9.4f}")
  print(f"Wrote {FLAGS.output} and {data_path}")


if __name__ == "__main__":
  cli.run(main)
