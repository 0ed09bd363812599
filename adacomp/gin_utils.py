"""Parsing `--gin_file` / `--gin_bindings` the t5x way, with errors that say what to fix.

The core's own configurables (training, data, checkpointing, sharding, kernels, evaluation,
models) are registered by importing this module; the methods' configurables are registered by
`adacomp.methods.registry`, which only the entry points (train.py, eval.py, scripts/) import, so
the core never imports a method.

Search paths, in order: the current directory, every `--gin_search_paths` entry, the repository
root and its `configs/` folder. So `--gin_file=configs/duo.gin`, `--gin_file=duo.gin` and
`include 'configs/dense.gin'` inside a config all work from any directory.

A config saved in a checkpoint is data, not code (checkpoints are shared between people):
`parse_saved_config` accepts only bindings and macros whose configurables and references are
this project's own (modules under adacomp/ and layers/) and whose values are literals; an
`import`, an `include`, a block or a reference to anything else is refused with its line, before
gin sees any of it. User-given --gin_file / --gin_bindings stay full gin.
"""
import importlib.util
import os
from typing import Optional, Sequence

import gin
from gin import config as gin_config
from gin import config_parser

# Registration side effects: each of these defines gin configurables of the core.
from adacomp import checkpointing  # pylint: disable=unused-import
from adacomp import data  # pylint: disable=unused-import
from adacomp import evaluation  # pylint: disable=unused-import
from adacomp import kernels  # pylint: disable=unused-import
from adacomp import sharding  # pylint: disable=unused-import
from adacomp import tasks  # pylint: disable=unused-import
from adacomp import training  # pylint: disable=unused-import
from adacomp.models import decoder  # pylint: disable=unused-import
from adacomp.models import vit  # pylint: disable=unused-import

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configs_dir() -> str:
  """The checkout's configs/, or the copy an installed (non-editable) package ships."""
  checkout = os.path.join(REPO_ROOT, "configs")
  if os.path.isdir(checkout):
    return checkout
  spec = importlib.util.find_spec("adacomp_configs")
  locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
  return locations[0] if locations else checkout


CONFIGS_DIR = _configs_dir()


class GinConfigError(ValueError):
  """A gin file or binding that cannot be parsed or does not match a configurable."""


def _safe_readers() -> None:
  """gin's package-path reader raises TypeError (not False) for a relative include such as
  'configs/dense.gin' when a namespace package named `configs` is importable (the repository on
  sys.path, run from another directory); make it answer "not here" so the search goes on."""
  fixed = []
  for reader, exists in gin_config._FILE_READERS:  # pylint: disable=protected-access
    if getattr(exists, "_adacomp_safe", False) or exists is os.path.isfile:
      fixed.append((reader, exists))
      continue

    def safe(path, _exists=exists):
      # Ask the package reader only about paths under a real (non-namespace) package; it logs
      # an ERROR line for every other path it is asked about.
      head = os.path.dirname(path).replace("/", ".")
      try:
        spec = importlib.util.find_spec(head) if head and not head.startswith(".") else None
      except (ImportError, ValueError):
        spec = None
      if spec is None or spec.origin is None:
        return False
      try:
        return _exists(path)
      except (TypeError, ValueError, ImportError):
        return False

    safe._adacomp_safe = True  # pylint: disable=protected-access
    fixed.append((reader, safe))
  gin_config._FILE_READERS[:] = fixed  # pylint: disable=protected-access


def search_paths(extra: Sequence[str] = ()) -> list:
  return [os.getcwd(), *[os.path.abspath(p) for p in extra], REPO_ROOT, CONFIGS_DIR]


def _in_configs(path: str) -> Optional[str]:
  """'configs/sizes/tiny.gin' (the spelling of configs and their includes) inside CONFIGS_DIR,
  wherever that is (a checkout, or an installed package's adacomp_configs)."""
  parts = os.path.normpath(path).split(os.sep)
  if "configs" not in parts:
    return None
  candidate = os.path.join(CONFIGS_DIR, *parts[len(parts) - parts[::-1].index("configs"):])
  return candidate if os.path.isfile(candidate) else None


def _configs_reader() -> None:
  """Lets gin's include statements find 'configs/...' in CONFIGS_DIR from any directory."""
  readers = gin_config._FILE_READERS  # pylint: disable=protected-access
  if any(getattr(exists, "_adacomp_configs", False) for _, exists in readers):
    return
  exists = lambda path: _in_configs(path) is not None
  exists._adacomp_configs = True  # pylint: disable=protected-access
  gin.config.register_file_reader(lambda path: open(_in_configs(path)), exists)


def available_configs() -> list:
  """Every gin file under configs/, spelt as --gin_file takes it ('configs/duo.gin'), also for
  an installed package's copy."""
  return sorted(os.path.join("configs", os.path.relpath(os.path.join(d, f), CONFIGS_DIR))
                for d, _, files in os.walk(CONFIGS_DIR) for f in files if f.endswith(".gin"))


def resolve_gin_file(path: str, extra_search_paths: Sequence[str] = ()) -> str:
  if os.path.isabs(path) and os.path.isfile(path):
    return path
  for root in search_paths(extra_search_paths):
    candidate = os.path.join(root, path)
    if os.path.isfile(candidate):
      return candidate
  if _in_configs(path):
    return _in_configs(path)
  raise GinConfigError(
      f"Gin file {path!r} not found (looked in {', '.join(search_paths(extra_search_paths))}). "
      f"Available configs: {', '.join(available_configs())}.")


def _add_search_paths(extra: Sequence[str]) -> None:
  _safe_readers()
  _configs_reader()
  present = set(gin_config._LOCATION_PREFIXES)  # pylint: disable=protected-access
  for path in search_paths(extra):
    if path not in present:
      gin.add_config_file_search_path(path)
      present.add(path)


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
          finalize: bool = True, search: Sequence[str] = ()) -> None:
  """Parses files, then bindings (later ones win), turning gin's errors into GinConfigError.

  `search`: extra directories for gin files and their includes (`--gin_search_paths`).
  """
  _add_search_paths(search)
  files = [resolve_gin_file(f, search) for f in gin_files]
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


PROJECT_MODULES = ("adacomp", "layers")


def _project_configurable(selector: str):
  """The registered configurable `selector` names, when it is one of this project's."""
  try:
    configurable = gin_config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
  except (ValueError, KeyError):
    return None
  if configurable is None or configurable.import_source is not None:
    return None  # unknown, or registered dynamically from a config's own imports
  module = (configurable.module or "").split(".")[0]
  wrapped = getattr(configurable.wrapped, "__module__", "") or ""
  if module in PROJECT_MODULES and wrapped.split(".")[0] in PROJECT_MODULES:
    return configurable
  return None


class _RecordingDelegate(config_parser.ParserDelegate):
  """Records every @reference and %macro of a statement instead of resolving it."""

  def __init__(self):
    self.references, self.macros = [], []

  def configurable_reference(self, scoped_configurable_name, evaluate):
    self.references.append(scoped_configurable_name)
    return ("@", scoped_configurable_name, evaluate)

  def macro(self, macro_name):
    self.macros.append(macro_name)
    return ("%", macro_name)


def check_saved_config(text: str, source: str) -> None:
  """Raises GinConfigError naming the first line of `text` that is not plain project data."""
  delegate = _RecordingDelegate()

  def refuse(line_num, line, why):
    raise GinConfigError(
        f"The gin config saved in {source} is refused at line {line_num}: {line.strip()!r}: "
        f"{why}. A checkpoint's config may only bind this project's configurables (adacomp/, "
        f"layers/) to literals, macros and references to them; it is never executed. If you "
        f"trust this checkpoint's author, inspect the config and pass the parts you need as "
        f"--gin_file/--gin_bindings instead.")

  parser = config_parser.ConfigParser(text, delegate)
  defined_macros, used_macros = set(), []
  while True:
    before = len(delegate.references), len(delegate.macros)
    try:
      statement = parser.parse_statement()
    except SyntaxError as e:
      refuse(e.lineno or "?", e.text or "", f"not a gin binding ({e.msg})")
    except (ValueError, TypeError) as e:
      refuse("?", "", f"not a gin binding ({e})")
    if statement is None:
      break
    where = (statement.location.line_num, statement.location.line_content or "")
    if isinstance(statement, config_parser.ImportStatement):
      refuse(*where, f"an import ({statement.format()}) would run code")
    if isinstance(statement, config_parser.IncludeStatement):
      refuse(*where, f"an include would read {statement.filename!r}, outside the checkpoint")
    if not isinstance(statement, config_parser.BindingStatement):
      refuse(*where, "only 'configurable.parameter = value' and 'MACRO = value' lines are read")
    if statement.arg_name:
      if _project_configurable(statement.selector) is None:
        refuse(*where, f"{statement.selector!r} is not a configurable of this project")
    else:
      if statement.scope or "." in statement.selector:
        refuse(*where, f"{statement.selector!r} is not a macro name")
      defined_macros.add(statement.selector)
    for name in delegate.references[before[0]:]:
      if _project_configurable(name.rsplit("/", 1)[-1]) is None:
        refuse(*where, f"@{name} is not a configurable of this project")
    used_macros.extend((name, where) for name in delegate.macros[before[1]:])
  for name, where in used_macros:
    if name != "gin.REQUIRED" and name.rsplit("/", 1)[-1] not in defined_macros:
      refuse(*where, f"%{name} is neither a macro defined in the config nor gin.REQUIRED")


def parse_saved_config(text: str, source: str) -> None:
  """Parses a config read from a checkpoint as data (see the module docstring)."""
  check_saved_config(text, source)
  try:
    gin.parse_config(text)
  except (ValueError, KeyError, SyntaxError, TypeError) as e:
    raise GinConfigError(f"The gin config saved in {source} does not parse: {e}") from e


def parse_checkpoint_config(checkpoint_dir: str, step: Optional[int] = None,
                            gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (),
                            finalize: bool = False) -> tuple:
  """Replaces the gin config with the one saved in a checkpoint, then `gin_files` and
  `gin_bindings` over it (later ones win); returns (step, meta) of that checkpoint."""
  step, meta = checkpointing.read_meta(checkpoint_dir, step)
  gin.clear_config()
  parse([], [], finalize=False)
  parse_saved_config(meta["gin_config"],
                     f"checkpoint step {step} of {checkpointing.checkpoint_root(checkpoint_dir)}")
  parse(gin_files, gin_bindings, finalize=finalize)
  return step, meta

