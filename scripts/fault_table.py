r"""Runs one fault of every kind against a real tiny run and prints what each one did.

  python scripts/fault_table.py                      # table to stdout and <scratch>/fault_table.md
  python scripts/fault_table.py --out=/tmp/faults.md --workdir=/tmp/adacomp_faults

A tiny run (tests/testdata/tiny_train.gin on a 12-file corpus, steps 2, 4, 6, 8 saved) is
trained once through train.py; every case copies it, applies its fault (a damaged file, a bad
binding, a planted config, a held lock, a full disk...), runs train.py or eval.py on it as a user
would, and checks the saved data afterwards:

  rejected runs   the whole workdir is byte for byte as it was before the command;
  resumed runs    every checkpoint file saved before is intact, in place or moved aside into
                  damaged_checkpoints/ (never deleted);
  diverged runs   every step kept has the parameter norm training started with.

The full disk is a real 1 MB-headroom tmpfs when the script may mount one (root), else a
monkeypatched write raising OSError(ENOSPC); the table says which. Needs a few minutes on 2
cores. See docs/reliability.md.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

from adacomp.checkpointing import file_digests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GIN = os.path.join(REPO, "tests", "testdata", "tiny_train.gin")

flags.DEFINE_string("out", None, "Markdown file the table is written to (default: "
                    "fault_table.md in the scratch directory).")
flags.DEFINE_string("workdir", None, "Scratch directory (default: a new temporary one).")
flags.DEFINE_list("only", [], "Run only the cases with these names.")
FLAGS = flags.FLAGS

EXPLOIT = ("from __gin__ import dynamic_registration\nimport os\n"
           "os.system.command = 'touch {marker}'\ntrain.init_checkpoint = @os.system()\n")

# Run by the disk-full case when no tmpfs can be mounted: train.py with every write of the
# step-10 data-position file failing as a full disk would.
ENOSPC_RUNNER = r"""
import errno, os, runpy, sys
from etils import epath
write_text = epath.gpath.PosixGPath.write_text
def full_disk(self, *a, **k):
  if ".orbax-checkpoint-tmp" in str(self) and "/10." in str(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
  return write_text(self, *a, **k)
epath.gpath.PosixGPath.write_text = full_disk
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def largest_array_file(step_dir, item="params"):
  d = os.path.join(step_dir, item, "ocdbt.process_0", "d")
  return max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)


def flip_bits(path):
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 3, len(data) // 3 + 16):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


class Runner:
  def __init__(self, scratch):
    self.scratch = scratch
    sys.path.insert(0, REPO)
    from tests.corpus import write_corpus  # pylint: disable=g-import-not-at-top
    self.glob = write_corpus(os.path.join(scratch, "text"))
    self.data_dir = os.path.join(scratch, "tfds")
    self.base = os.path.join(scratch, "base")

  def bindings(self, *extra, glob=None, data_dir=None):
    return [f"lm_dataset.glob = '{glob or self.glob}'",
            f"lm_dataset.data_dir = '{data_dir or self.data_dir}'", *extra]

  def cli(self, script, args, prefix=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, *prefix, os.path.join(REPO, script), *args],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
                         check=False)
    return out.returncode, out.stdout + out.stderr

  def train(self, workdir, *bindings, prefix=(), **kw):
    args = [f"--gin_file={TINY_GIN}", f"--workdir={workdir}"]
    args += [f"--gin_bindings={b}" for b in self.bindings(*bindings, **kw)]
    return self.cli("train.py", args, prefix)

  def eval(self, workdir, *args):
    return self.cli("eval.py", [f"--checkpoint_dir={workdir}", *args])

  def copy(self, name):
    path = os.path.join(self.scratch, name)
    shutil.copytree(self.base, path)
    return path


def first_line(output: str) -> str:
  for line in output.splitlines():
    if line.startswith("ERROR:") or line.startswith("WARNING: ") and "absl" not in line:
      return line.strip()
  return "(none)"


def unchanged(before: dict, workdir: str) -> bool:
  return file_digests(workdir) == before


def checkpoints_kept(before: dict, workdir: str) -> bool:
  """Every checkpoint file of `before` (file_digests of checkpoints/) still has its bytes, in
  place or moved to damaged_checkpoints/."""
  now = file_digests(os.path.join(workdir, "checkpoints"))
  aside = file_digests(os.path.join(workdir, "damaged_checkpoints"))
  return all(now.get(k) == v or aside.get(k) == v for k, v in before.items())


def params_norms(workdir):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, "checkpoints")
  norms = []
  with ocp.CheckpointManager(root, item_names=("params",)) as manager:
    for step in manager.all_steps():
      params = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore()))["params"]
      norms.append(float(np.sqrt(sum(np.sum(np.square(np.asarray(x)))
                                     for x in jax.tree.leaves(params)))))
  return norms


def cases(r: Runner):
  """(name, category, function returning (exit code, output, intact))."""

  def planted_config():
    w = r.copy("planted")
    marker = os.path.join(r.scratch, "pwned")
    meta_file = os.path.join(w, "checkpoints", "8", "meta", "metadata")
    meta = json.load(open(meta_file))
    meta["gin_config"] = EXPLOIT.format(marker=marker) + meta["gin_config"]
    json.dump(meta, open(meta_file, "w"))
    before = file_digests(w)
    code, out = r.eval(w)
    return code, out, unchanged(before, w) and not os.path.exists(marker)

  def flipped_bits_eval():
    w = r.copy("flipped_eval")
    flip_bits(largest_array_file(os.path.join(w, "checkpoints", "8")))
    before = file_digests(w)
    code, out = r.eval(w)
    return code, out, unchanged(before, w)

  def flipped_bits_resume():
    w = r.copy("flipped_resume")
    flip_bits(largest_array_file(os.path.join(w, "checkpoints", "8")))
    before = file_digests(os.path.join(w, "checkpoints"))
    code, out = r.train(w, "train.num_steps = 10", "make_optimizer.decay_steps = 10")
    return code, out, checkpoints_kept(before, w)

  def live_lock():
    w = r.copy("locked")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
      with open(os.path.join(w, "train.lock"), "w") as f:
        json.dump({"host": os.uname().nodename, "pid": holder.pid,
                   "start": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
      before = file_digests(w)
      code, out = r.train(w, "train.num_steps = 10")
      return code, out, unchanged(before, w)
    finally:
      holder.kill()
      holder.wait()

  def stale_lock():
    w = r.copy("stale_lock")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with open(os.path.join(w, "train.lock"), "w") as f:
      json.dump({"host": os.uname().nodename, "pid": gone.pid, "start": "earlier"}, f)
    before = file_digests(os.path.join(w, "checkpoints"))
    code, out = r.train(w, "train.num_steps = 10", "make_optimizer.decay_steps = 10")
    return code, out, checkpoints_kept(before, w) and not os.path.exists(
        os.path.join(w, "train.lock"))

  def bad_binding(binding):
    def run():
      w = r.copy("arg_" + hashlib.md5(binding.encode()).hexdigest()[:6])
      before = file_digests(w)
      code, out = r.train(w, "train.num_steps = 10", binding)
      return code, out, unchanged(before, w)
    return run

  def shape_mismatch():
    w = r.copy("mismatch")
    before = file_digests(w)
    code, out = r.train(w, "train.num_steps = 10", "DecoderConfig.d_ff = 96")
    return code, out, unchanged(before, w)

  def explosion():
    w = os.path.join(r.scratch, "explosion")
    code, out = r.train(w, "make_optimizer.learning_rate = 1e3", "make_manager.save_every = 1",
                        "make_optimizer.warmup_steps = 1", "train.eval_every = 0")
    norms = params_norms(w) if os.path.isdir(os.path.join(w, "checkpoints")) else []
    return code, out, bool(norms) and max(norms) < 10 * norms[0]

  def corrupt_data_file():
    data_dir = os.path.join(r.scratch, "tfds_corrupt")
    shutil.copytree(r.data_dir, data_dir)
    for root, _, files in os.walk(data_dir):
      for f in files:
        if "train.array_record" in f:
          path = os.path.join(root, f)
          data = bytearray(open(path, "rb").read())
          for i in range(0, len(data), 7):
            data[i] ^= 0x5A
          open(path, "wb").write(bytes(data))
    w = os.path.join(r.scratch, "corrupt_data")
    code, out = r.train(w, data_dir=data_dir)
    return code, out, not os.path.exists(w)

  def one_file_corpus():
    from tests.corpus import write_corpus  # pylint: disable=g-import-not-at-top
    glob = write_corpus(os.path.join(r.scratch, "one_file"), num_files=1)
    w = os.path.join(r.scratch, "one_file_run")
    code, out = r.train(w, glob=glob, data_dir=os.path.join(r.scratch, "tfds_one"))
    return code, out, not os.path.exists(w)

  def corrupt_position():
    w = r.copy("position")
    with open(os.path.join(w, "checkpoints", "8", "data", "process_0-of-1.json"), "w") as f:
      f.write('{"epoch": 0, "doc"')
    before = file_digests(os.path.join(w, "checkpoints"))
    code, out = r.train(w)
    return code, out, checkpoints_kept(before, w)

  def truncated_latest():
    w = r.copy("truncated")
    path = largest_array_file(os.path.join(w, "checkpoints", "8"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    before = file_digests(os.path.join(w, "checkpoints"))
    code, out = r.train(w)
    return code, out, checkpoints_kept(before, w)

  def full_disk():
    w = os.path.join(r.scratch, "full_disk")
    os.makedirs(w)
    mounted = False
    if os.geteuid() == 0:
      mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", w],
                               capture_output=True, check=False).returncode == 0
    try:
      shutil.copytree(r.base, w, dirs_exist_ok=True)
      if mounted:  # shrink it to what the copy uses plus 64 kB: too little for another step
        used = shutil.disk_usage(w).used
        subprocess.run(["mount", "-o", f"remount,size={used + 64 * 1024}", w], check=True)
      before = file_digests(os.path.join(w, "checkpoints"))
      bindings = ("train.num_steps = 10", "make_optimizer.decay_steps = 10")
      if mounted:
        code, out = r.train(w, *bindings)
      else:
        runner = os.path.join(r.scratch, "enospc_runner.py")
        open(runner, "w").write(ENOSPC_RUNNER)
        code, out = r.train(w, *bindings, prefix=(runner,))
      root = os.path.join(w, "checkpoints")
      no_partial = not [p for p in os.listdir(root) if "tmp" in p]
      intact = checkpoints_kept(before, w) and no_partial
      return code, out + f"\n(disk: {'tmpfs, 64 kB free' if mounted else 'ENOSPC patch'})", intact
    finally:
      if mounted:
        subprocess.run(["umount", w], check=False)

  def step_never_saved():
    w = r.copy("no_step")
    before = file_digests(w)
    code, out = r.eval(w, "--step=5")
    return code, out, unchanged(before, w)

  def missing_metadata():
    w = r.copy("no_meta")
    shutil.rmtree(os.path.join(w, "checkpoints", "8", "meta"))
    before = file_digests(w)
    code, out = r.eval(w)
    return code, out, unchanged(before, w)

  return [
      ("planted config (import os, binds a call)", "1 config as data", planted_config),
      ("flipped bits in params, eval.py", "2 integrity", flipped_bits_eval),
      ("flipped bits in params, resume", "2 integrity", flipped_bits_resume),
      ("second writer, live lock holder", "3 one writer", live_lock),
      ("stale lock (holder's pid gone)", "3 one writer", stale_lock),
      ("make_manager.keep = 0", "4 arguments", bad_binding("make_manager.keep = 0")),
      ("train.num_steps = 0", "4 arguments", bad_binding("train.num_steps = 0")),
      ("train.batch_size = 0", "4 arguments", bad_binding("train.batch_size = 0")),
      ("train.log_every = 0", "4 arguments", bad_binding("train.log_every = 0")),
      ("train.num_steps = '10' (a string)", "4 arguments", bad_binding("train.num_steps = '10'")),
      ("make_optimizer.learning_rate = -1.0", "4 arguments",
       bad_binding("make_optimizer.learning_rate = -1.0")),
      ("make_mesh.data = 3 (1 device)", "4 arguments", bad_binding("make_mesh.data = 3")),
      ("resume with another d_ff", "5 order", shape_mismatch),
      ("learning rate 1e3 (finite explosion)", "6 divergence", explosion),
      ("corrupt array_record data file", "7 data and disk", corrupt_data_file),
      ("one-file corpus", "7 data and disk", one_file_corpus),
      ("corrupt data-position file (latest step)", "7 data and disk", corrupt_position),
      ("truncated latest checkpoint", "7 data and disk", truncated_latest),
      ("full disk while saving", "7 data and disk", full_disk),
      ("eval.py --step=5 (never saved)", "7 data and disk", step_never_saved),
      ("checkpoint missing its metadata", "7 data and disk", missing_metadata),
  ]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax is chatty when the cases read checkpoints
  scratch = FLAGS.workdir or tempfile.mkdtemp(prefix="adacomp_faults_")
  os.makedirs(scratch, exist_ok=True)
  r = Runner(scratch)
  print(f"Base run in {r.base} ...", flush=True)
  code, out = r.train(r.base)
  if code != 0:
    print(out[-3000:])
    raise SystemExit("the base run failed")
  rows = []
  selected = [c for c in cases(r) if not FLAGS.only or c[0] in FLAGS.only]
  for i, (name, category, fn) in enumerate(selected, 1):
    start = time.time()
    code, out, intact = fn()
    line = first_line(out).replace("|", "\\|")
    if "(disk:" in out:
      name += " " + out.rsplit("(disk:", 1)[1].strip().rstrip(")").join(["(", ")"])
    rows.append((name, category, code, line, "yes" if intact else "NO"))
    print(f"[{i}/{len(selected)}] {name}: exit {code}, intact {rows[-1][-1]} "
          f"({time.time() - start:.0f} s)\n    {line[:160]}", flush=True)
  table = ["| case | category | exit code | first ERROR / WARNING line | saved data intact |",
           "|---|---|---|---|---|"]
  table += [f"| {n} | {c} | {code} | {l} | {i} |" for n, c, code, l, i in rows]
  text = "\n".join(table) + "\n"
  print("\n" + text)
  out = FLAGS.out or os.path.join(scratch, "fault_table.md")
  with open(out, "w") as f:
    f.write(text)
  print(f"Written to {out}")
  if any(i != "yes" for *_, i in rows):
    raise SystemExit("some case did not keep the saved data intact")


if __name__ == "__main__":
  app.run(main)
