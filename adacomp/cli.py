"""What every command-line entry point shares: absl set-up, quiet libraries, one ERROR line.

    from adacomp import cli
    def main(): ...                  # raise ValueError (or a subclass) for a user's mistake
    if __name__ == "__main__":
      cli.run(main)

Importing this module is cheap (absl only), so `--help` answers at once; entry points import
jax, the core and `adacomp.methods.registry` inside `main`.
"""
import re
import sys
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging

from adacomp import hostmem

# A user's mistake (bad config, argument, data or checkpoint) raises one of these with a message
# that names the cause and the fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, PermissionError, FloatingPointError, FileNotFoundError)


def error(message: str, code: int = 1) -> None:
  """Prints one `ERROR: ...` line (the message may continue on later lines) and exits."""
  # gin appends "In call to configurable 'name' (<function ...>)" to errors raised inside a
  # configurable; the message already names the parameter, the function's address helps nobody.
  message = re.sub(r"\n\s*In call to configurable '[^']*' \([^\n]*\)", "", message)
  print(f"\nERROR: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def run(main: Callable[[], Optional[int]]) -> None:
  """absl's app.run around `main()`: libraries at WARNING unless --verbosity is given, stray
  positional arguments refused, user errors as one ERROR line and exit code 1; on the CPU,
  malloc keeps XLA's freed buffers for the next call (`hostmem.keep_freed_memory`)."""

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
      # Before any jax computation: XLA's CPU threads then reuse freed buffers (adacomp.hostmem).
      hostmem.keep_freed_memory()
      return main()
    except USER_ERRORS as e:
      error(str(e))

  app.run(wrapped)


def whole_split(value: str) -> Optional[int]:
  """`--eval_batches`: a positive count, or `all` for the whole split (None in gin)."""
  if value.strip().lower() == "all":
    return None
  try:
    count = int(value)
  except ValueError:
    count = 0
  if count < 1:
    raise ValueError(f"--eval_batches={value!r}: give a positive number of batches, or 'all' "
                     f"for the whole split.")
  return count
