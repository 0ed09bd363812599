"""The architecture's dependency rules, read from the source with `ast` (nothing is imported).

pallas_kernels <- layers <- adacomp core <- adacomp.methods <- train.py, eval.py, scripts/.
"""
import ast
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("adacomp", "layers", "pallas_kernels")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-len(".py")].split(os.sep)
  if rel[-1] == "__init__":
    rel = rel[:-1]
  return ".".join(rel)


def _source_modules() -> dict:
  """{module name: path} of every .py file under the three packages."""
  found = {}
  for package in PACKAGES:
    for root, _, files in os.walk(os.path.join(REPO, package)):
      for f in files:
        if f.endswith(".py"):
          found[_module_name(os.path.join(root, f))] = os.path.join(root, f)
  return found


MODULES = _source_modules()


def _imports(name: str) -> set:
  """Every module `name` imports, at any depth of the file (lazy imports in functions too).

  `from pkg import sub` counts as importing pkg.sub when sub is a module, and as importing pkg
  only when it also takes a name defined in pkg/__init__.py.
  """
  path = MODULES[name]
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  is_package = path.endswith("__init__.py")
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative import
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module
      subs = {f"{module}.{a.name}" for a in node.names} & set(MODULES)
      out.update(subs)
      if len(subs) < len(node.names):  # some name is an attribute of `module` itself
        out.add(module)
  return out


GRAPH = {name: _imports(name) for name in MODULES}


def _internal(name: str) -> set:
  return {m for m in GRAPH[name] if m in MODULES}


def test_the_graph_sees_every_package_and_their_imports():
  # Guards the walker itself: the rules below would pass vacuously on an empty graph.
  assert {"adacomp.training", "layers.duo", "pallas_kernels.routed_ffn"} <= set(MODULES)
  assert "adacomp.checkpointing" in _internal("adacomp.training")
  assert "pallas_kernels" in _internal("layers.duo")


def test_no_import_cycles():
  index, low, on_stack, stack, cycles = {}, {}, set(), [], []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(_internal(v)):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in _internal(v):
        cycles.append(sorted(component))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for v in sorted(MODULES):
    if v not in index:
      visit(v)
  assert not cycles, f"import cycles: {cycles}"


def _core(name: str) -> bool:
  return name.split(".")[0] == "adacomp" and not name.startswith("adacomp.methods")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _core(n)))
def test_the_core_imports_no_method(name):
  methods = sorted(m for m in GRAPH[name] if m.startswith("adacomp.methods"))
  assert not methods, f"{name} (core) imports {methods}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("layers")))
def test_layers_import_nothing_from_adacomp(name):
  bad = sorted(m for m in GRAPH[name] if m.split(".")[0] == "adacomp")
  assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("pallas_kernels")))
def test_pallas_kernels_import_only_jax_numpy_and_the_standard_library(name):
  allowed = {"jax", "jaxlib", "numpy", "pallas_kernels"}
  bad = sorted(m for m in GRAPH[name]
               if m.split(".")[0] not in allowed and m.split(".")[0] not in sys.stdlib_module_names)
  assert not bad, f"{name} imports {bad}"


def test_a_method_imports_no_other_method():
  # Each method is one package; what two methods share belongs in the core or layers/.
  for name in MODULES:
    if not name.startswith("adacomp.methods.") or name == "adacomp.methods.registry":
      continue
    own = name.split(".")[2]
    others = sorted({m.split(".")[2] for m in GRAPH[name] if m.startswith("adacomp.methods.")
                     and len(m.split(".")) > 2 and m.split(".")[2] != own})
    assert not others, f"{name} imports methods {others}"


def test_only_the_registry_imports_every_method():
  registry = {m.split(".")[2] for m in GRAPH["adacomp.methods.registry"]
              if m.startswith("adacomp.methods.") and len(m.split(".")) > 2}
  with_configurables = {n.split(".")[2] for n, p in MODULES.items()
                        if n.startswith("adacomp.methods.") and len(n.split(".")) > 2
                        and "gin.configurable" in open(p, encoding="utf-8").read()}
  assert with_configurables and with_configurables <= registry
