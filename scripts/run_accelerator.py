r"""Everything worth measuring on an accelerator, in one run, into one markdown report.

  bash benchmarks/run_accelerator.sh            # what to run on a lent GPU or TPU machine
  python scripts/run_accelerator.py --quick     # the same, smaller (about 10 min on a 2-core CPU)

Steps, each a subprocess with its own time limit (a failing or slow step is reported, not fatal):
  1. the kernel tests (tests/pallas_kernels) on the compiled Pallas kernels of the platform
     (ADACOMP_KERNEL_TEST_IMPLS=pallas); on CPU, where no kernel compiles, in interpret mode;
  2. scripts/bench_kernels.py: every op against the XLA reference and the dense equivalent;
  3. scripts/bench_duo.py and scripts/bench_routing.py: routed inference against dense;
  4. scripts/bench_train_step.py: each method's training step against dense.
On CPU `impl='auto'` resolves to the XLA reference, so the timings are the XLA paths: the
report says so. Writes `<output_dir>/accelerator_<device>.md` (device, jax version, date, a
summary table, then each step's own tables) and prints where it is.
"""
import argparse
import datetime
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(quick: bool, on_accelerator: bool) -> list:
  """(name, command, extra environment, time limit in s)."""
  py = sys.executable
  impls = "pallas" if on_accelerator else "interpret,interpret_gpu"
  tests = [py, "-m", "pytest", "tests/pallas_kernels", "-q", "-p", "no:cacheprovider"]
  if quick and not on_accelerator:
    tests += ["-k", "not gradient and not backward"]  # the interpreter is slow on CPU
  return [
      ("kernel tests", tests, {"ADACOMP_KERNEL_TEST_IMPLS": impls}, 900),
      ("kernel benchmarks", [py, "scripts/bench_kernels.py"] + (["--quick"] if quick else []),
       {}, 900),
      ("Duo routed inference", [py, "scripts/bench_duo.py"] + (["--quick"] if quick else []),
       {}, 600),
      ("informed routing / MoD inference",
       [py, "scripts/bench_routing.py", f"--repeats={3 if quick else 15}"], {}, 600),
      ("training step per method",
       [py, "scripts/bench_train_step.py", f"--steps={6 if quick else 30}", "--rounds=1"]
       + (["--methods=dense,duo (random routes; masked),tokenformer"] if quick else []), {},
       1800),
  ]


def _device() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "kind": device.device_kind,
          "count": jax.device_count(), "jax": jax.__version__}


def _markdown_tables(text: str) -> str:
  """The markdown table lines (and their headings) of a tool's output."""
  keep = [l for l in text.splitlines() if l.startswith("|") or l.startswith("#")]
  return "\n".join(keep)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="Smaller sizes, fewer repeats.")
  parser.add_argument("--output_dir", default=os.path.join(REPO, "benchmarks"),
                      help="Where the report goes.")
  parser.add_argument("--only", default=None,
                      help="Comma-separated step names to run (default: all).")
  args = parser.parse_args(argv)
  device = _device()
  on_accelerator = device["backend"] in ("gpu", "cuda", "rocm", "tpu")
  print(f"Device: {device['kind']} x{device['count']} ({device['backend']}), jax "
        f"{device['jax']}" + ("" if on_accelerator else
                              ": no accelerator, so the kernels run in interpret mode and the "
                              "benchmarks time the XLA paths"), flush=True)
  rows, sections = [], []
  for name, cmd, env, limit in _steps(args.quick, on_accelerator):
    if args.only and name not in args.only.split(","):
      continue
    print(f"[{len(rows) + 1}] {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    try:
      result = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=limit)
      code, out = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as e:
      partial = e.stdout or ""
      code, out = "timeout", partial.decode(errors="replace") if isinstance(partial, bytes) \
          else partial
    wall = time.time() - start
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    summary = re.sub(r"\s+", " ", tail)[:120].replace("|", "/")
    rows.append(f"| {name} | {'ok' if code == 0 else f'FAILED ({code})'} | {wall:.0f} | "
                f"{summary} |")
    print(f"    {'ok' if code == 0 else f'FAILED ({code})'} in {wall:.0f}s: {summary}",
          flush=True)
    body = _markdown_tables(out) or "```\n" + out[-3000:] + "\n```"
    env_note = " with " + " ".join(f"{k}={v}" for k, v in env.items()) if env else ""
    sections.append(f"## {name}\n\n`{' '.join(cmd[1:])}`{env_note}\n\n{body}\n")
  slug = re.sub(r"[^A-Za-z0-9]+", "_", device["kind"]).strip("_").lower() or "device"
  path = os.path.join(args.output_dir, f"accelerator_{slug}.md")
  os.makedirs(args.output_dir, exist_ok=True)
  header = (f"# Accelerator report: {device['kind']}\n\n"
            f"{device['count']} x {device['kind']} ({device['backend']}), jax {device['jax']}, "
            f"{datetime.date.today().isoformat()}, `python scripts/run_accelerator.py"
            f"{' --quick' if args.quick else ''}`."
            + ("" if on_accelerator else " No accelerator: kernels ran in interpret mode, "
               "timings are the XLA paths on this CPU.") + "\n\n"
            "| step | result | wall s | last line |\n|---|---|---|---|\n")
  with open(path, "w", encoding="utf-8") as f:
    f.write(header + "\n".join(rows) + "\n\n" + "\n".join(sections))
  print(f"Wrote {path}", flush=True)
  return 0 if all("| ok |" in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
