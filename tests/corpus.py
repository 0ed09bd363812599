"""End-to-end training tests' helpers: a small text corpus and the tiny training config."""
import os
import random

from adacomp import gin_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GIN = os.path.join(REPO, "tests", "testdata", "tiny_train.gin")


def write_corpus(directory, num_files=12, seed=0):
  """Small Python-like text files with enough structure to learn from."""
  rng = random.Random(seed)
  words = ["def", "return", "self", "import", "for", "in", "if", "else", "value", "items",
           "class", "print", "range", "len", "None", "True", "False", "yield", "with", "as"]
  os.makedirs(directory, exist_ok=True)
  for i in range(num_files):
    lines = []
    for j in range(60):
      body = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
      lines.append(f"    {body}  # line {j}")
    with open(os.path.join(directory, f"file_{i:02d}.py"), "w") as f:
      f.write(f"def function_{i}(x):\n" + "\n".join(lines) + "\n")
  return os.path.join(directory, "*.py")


def corpus_bindings(corpus):
  return [f"lm_dataset.glob = '{corpus['glob']}'", f"lm_dataset.data_dir = '{corpus['data_dir']}'"]


def configure(corpus, *bindings):
  """Parses the tiny training config with the corpus and extra bindings (later ones win)."""
  gin_utils.parse([TINY_GIN], corpus_bindings(corpus) + list(bindings), finalize=False)
