"""The commands in README.md and the method pages refer to things that exist, as written.

Each command of a ```bash block is read (continuation lines joined, loops' variables filled in):
its script must exist and define every flag it passes; a train.py command's gin files and
bindings must parse, and a stage config must be given its earlier stage's workdir.
scripts/pareto_checkpoints.sh, which trains every checkpoint of docs/pareto.md, must run the
pages' own commands. The last test runs train.py from another directory for a few steps.
"""
import glob
import os
import re
import shlex
import subprocess
import sys

import gin
import pytest

from adacomp import gin_utils
from adacomp.methods import registry  # pylint: disable=unused-import
from tests.corpus import REPO, corpus_bindings

PAGES = sorted(["README.md", "docs/hf.md", "docs/pareto.md", "docs/reliability.md", "pallas_kernels/README.md", "benchmarks/README.md"]
               + [os.path.relpath(p, REPO) for p in
                  glob.glob(os.path.join(REPO, "adacomp", "methods", "*", "README.md"))])
# Values for the shell variables the pages' abbreviations use (loop variables are expanded).
SHELL_VARS = {"R": "/tmp/adacomp/tokenformer", "A": "/tmp/adacomp"}
# `for v in a b c; do BODY; done`, on one line or several (no nesting on these pages).
_LOOP = re.compile(r"\bfor (\w+) in ([^;\n]+); do\s(.*?)(?:;\s*|\n\s*)done\b", flags=re.S)


def _expand_loops(block: str) -> str:
  """The block with each loop replaced by its body once per value, the variable filled in."""
  while (m := _LOOP.search(block)):
    var, values, body = m.group(1), m.group(2).split(), m.group(3)
    bodies = [body.replace("${" + var + "}", v).replace("$" + var, v) for v in values]
    block = block[:m.start()] + "\n".join(bodies) + block[m.end():]
  return block


def _block_commands(block: str) -> list:
  """Every `python X.py ...` command of a bash block, as argument lists."""
  out = []
  block = _expand_loops(re.sub(r"\\\n\s*", " ", block))  # join continuation lines first
  for name, value in SHELL_VARS.items():
    block = block.replace("${" + name + "}", value).replace("$" + name, value)
  for line in block.split("\n"):
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    segment = []
    for token in list(lexer) + [";"]:
      if token in (";", "&", "&&", "|", "||"):
        while segment and (segment[0] in ("do", "done") or "=" in segment[0]):
          segment = segment[1:]  # loop keywords, environment assignments
        if len(segment) > 1 and segment[0] == "python" and segment[1].endswith(".py"):
          out.append(segment)
        segment = []
      else:
        segment.append(token)
  return out


def _commands(page: str) -> list:
  """Every `python ...` command in the page's bash blocks, as argument lists."""
  text = open(os.path.join(REPO, page), encoding="utf-8").read()
  return [cmd for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
          for cmd in _block_commands(block)]


# The script that trains every checkpoint of docs/pareto.md runs the pages' commands: its
# `train ARGS` is `python train.py ARGS` and "$PY" is python.
CHECKPOINT_SCRIPT = "scripts/pareto_checkpoints.sh"


def _script_commands(script: str) -> list:
  text = open(os.path.join(REPO, script), encoding="utf-8").read()
  text = re.sub(r"^train\(\).*$", "", text, flags=re.M)  # the function's own definition
  text = re.sub(r"^(\s*)train ", r"\1python train.py ", text, flags=re.M)
  return _block_commands(text.replace('"$PY" ', "python "))


COMMANDS = [(page, cmd) for page in PAGES for cmd in _commands(page)]
SCRIPT_COMMANDS = [(CHECKPOINT_SCRIPT, cmd) for cmd in _script_commands(CHECKPOINT_SCRIPT)]
ALL_COMMANDS = COMMANDS + SCRIPT_COMMANDS
PAGE_COMMANDS = {tuple(cmd) for _, cmd in COMMANDS}


def _id(item):
  page, cmd = item
  script = next(a for a in cmd if a.endswith(".py"))
  return f"{page}:{script}:{ALL_COMMANDS.index(item)}"


def _flags(cmd) -> dict:
  """{flag: [values]} of a command's --flag=value / --flag arguments."""
  found = {}
  for arg in cmd:
    if arg.startswith("--"):
      name, _, value = arg[2:].partition("=")
      found.setdefault(name, []).append(value)
  return found


_HELP = {}


def _help(script: str) -> str:
  if script not in _HELP:
    _HELP[script] = subprocess.run(
        [sys.executable, os.path.join(REPO, script), "--helpfull"], capture_output=True,
        text=True, cwd=REPO, timeout=300).stdout
  return _HELP[script]


def test_the_pages_hold_the_commands_this_test_reads():
  # Guards the reader: a regex that found nothing would make every test below vacuous.
  scripts = {next(a for a in cmd if a.endswith(".py")) for _, cmd in COMMANDS}
  assert {"train.py", "eval.py", "scripts/duo_oracle.py", "scripts/grow.py"} <= scripts
  assert len(COMMANDS) > 40
  script_runs = [next(a for a in cmd if a.endswith(".py")) for _, cmd in SCRIPT_COMMANDS]
  assert script_runs.count("train.py") >= 26 and "scripts/pareto.py" in script_runs


@pytest.mark.parametrize("item", ALL_COMMANDS, ids=_id)
def test_command_names_an_existing_script_and_its_flags(item):
  _, cmd = item
  script = next(a for a in cmd if a.endswith(".py"))
  assert os.path.isfile(os.path.join(REPO, script)), f"{script} does not exist"
  helptext = _help(script)
  for name in _flags(cmd):
    assert f"--{name}:" in helptext or f"--[no]{name}:" in helptext, (
        f"{script} has no flag --{name}")


TRAIN_COMMANDS = [item for item in COMMANDS if "train.py" in item[1]]


@pytest.mark.parametrize("item", TRAIN_COMMANDS, ids=_id)
def test_train_command_parses_and_passes_its_stage_input(item):
  _, cmd = item
  flags = _flags(cmd)
  files = flags.get("gin_file", [])
  if not files or any(f.startswith("/tmp") or "..." in f for f in files):
    pytest.skip("the config is written by an earlier command (a grown run's config.gin)")
  gin_utils.parse(files, flags.get("gin_bindings", []), finalize=False)
  try:
    init = gin.query_parameter("train.init_checkpoint")
  except ValueError:
    init = None
  assert not isinstance(init, gin.config.ConfigurableReference), (
      f"{' '.join(cmd)}: a stage config run without train.init_checkpoint")


@pytest.mark.parametrize(
    "item", [c for c in SCRIPT_COMMANDS if "scripts/bench_vit.py" not in c[1]], ids=_id)
def test_checkpoint_script_runs_the_pages_commands(item):
  # Each training, growth and plot command of the script is a page's command as written there
  # (bench_vit.py differs: the script adds --output for the plot), so the two cannot drift.
  assert tuple(item[1]) in PAGE_COMMANDS, (
      f"{CHECKPOINT_SCRIPT} runs `{' '.join(item[1])}`, which no page documents; make the "
      f"script and the method page run the same command.")


def test_train_runs_from_another_directory(corpus, tmp_path):
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  tiny = ["DecoderConfig.num_layers = 1", "DecoderConfig.d_model = 32",
          "DecoderConfig.d_ff = 64", "DecoderConfig.num_heads = 2", "DecoderConfig.head_dim = 16",
          "DecoderConfig.max_len = 32", "train.seq_len = 32", "train.batch_size = 2",
          "train.num_steps = 3", "train.log_every = 1", "train.eval_every = 0",
          "train.eval_batches = 1", "make_manager.save_every = 3"]
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--gin_file=configs/duo.gin",
         f"--workdir={tmp_path / 'run'}"]
  cmd += [f"--gin_bindings={b}" for b in tiny + corpus_bindings(corpus)]
  result = subprocess.run(cmd, cwd=str(elsewhere), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 3/3" in result.stdout
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")
  assert f"python eval.py --checkpoint_dir={tmp_path / 'run'}" in result.stdout
