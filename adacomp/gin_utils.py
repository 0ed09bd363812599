"""Parsing `--gin_file` / `--gin_bindings` the t5x way, with errors that say what to fix.

Every module that registers configurables is imported here first, so a config may name any of
them. Includes resolve against the current directory and the repository root, so
`include 'configs/sizes/tiny.gin'` works from anywhere.
"""
import os
from typing import Optional, Sequence

import gin

# Registration side effects: each of these defines gin configurables.
from adacomp import checkpointing  # pylint: disable=unused-import
from adacomp import data  # pylint: disable=unused-import
from adacomp import duo_config  # pylint: disable=unused-import
from adacomp import tokenformer_config  # pylint: disable=unused-import
from adacomp import routing_config  # pylint: disable=unused-import
from adacomp import evaluator  # pylint: disable=unused-import
from adacomp import kernels  # pylint: disable=unused-import
from adacomp import sharding  # pylint: disable=unused-import
from adacomp import training  # pylint: disable=unused-import
from adacomp.models import decoder  # pylint: disable=unused-import

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")


class GinConfigError(ValueError):
  """A gin file or binding that cannot be parsed or does not match a configurable."""


def resolve_gin_file(path: str) -> str:
  for candidate in (path, os.path.join(REPO_ROOT, path), os.path.join(CONFIGS_DIR, path)):
    if os.path.isfile(candidate):
      return candidate
  available = sorted(os.path.relpath(os.path.join(d, f), REPO_ROOT)
                     for d, _, files in os.walk(CONFIGS_DIR) for f in files if f.endswith(".gin"))
  raise GinConfigError(
      f"Gin file {path!r} not found (looked in the current directory and {REPO_ROOT}). "
      f"Available configs: {', '.join(available)}.")


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
          finalize: bool = True) -> None:
  """Parses files, then bindings (later ones win), turning gin's errors into GinConfigError."""
  for search_path in (os.getcwd(), REPO_ROOT):
    gin.add_config_file_search_path(search_path)
  files = [resolve_gin_file(f) for f in gin_files]
  for f in files:
    try:
      gin.parse_config_file(f)
    except (ValueError, KeyError, SyntaxError, IOError) as e:
      raise GinConfigError(
          f"Error in gin file {f}: {e}\nFix the file (a configurable or parameter name that does "
          f"not exist is the usual cause).") from e
  for binding in gin_bindings:
    try:
      gin.parse_config(binding)
    except (ValueError, KeyError, SyntaxError) as e:
      raise GinConfigError(
          f"Error in --gin_bindings={binding!r}: {e}\nBindings read "
          f"'configurable.parameter = value'; check the name against the configurables in "
          f"adacomp/ and layers/ (e.g. train.num_steps, DecoderConfig.num_layers).") from e
  if finalize:
    gin.finalize()


def parse_checkpoint_config(checkpoint_dir: str, step: Optional[int] = None,
                            gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (),
                            finalize: bool = False) -> tuple:
  """Replaces the gin config with the one saved in a checkpoint, then `gin_files` and
  `gin_bindings` over it (later ones win); returns (step, meta) of that checkpoint."""
  step, meta = checkpointing.read_meta(checkpoint_dir, step)
  gin.clear_config()
  parse([], [], finalize=False)
  gin.parse_config(meta["gin_config"])
  parse(gin_files, gin_bindings, finalize=finalize)
  return step, meta
