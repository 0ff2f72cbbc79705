"""Pages written at build time from the code, so that they cannot go stale.

* ``api/<subpackage>.md``: one autodoc entry per name in each public
  subpackage's ``__all__`` (subpackages are discovered, so a new one gets its
  page without editing the docs); the top-level names link to them.
* ``troubleshooting_index.md``: every ``raise`` and ``warnings.warn`` in the
  package, with the module, the exception type and the message's words.

A public name without a docstring, or whose docstring has no ``Example:``
section with a doctest, fails the build. A data constant (a tuple, say) has no
docstring of its own: its documentation is the attribute docstring (or ``#:``
comment) where it is assigned, in one of its subpackage's modules, which the
API page shows in place of its type's docstring.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import multirate_optax

PACKAGE = Path(multirate_optax.__file__).parent


def public_subpackages() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(multirate_optax.__path__)
                if m.ispkg and not m.name.startswith("_"))


def is_data(obj: object) -> bool:
  """Documented with ``autodata``: neither a class nor callable."""
  return not inspect.isclass(obj) and not callable(obj)


def attribute_doc(module: str, name: str) -> str:
  """The attribute docstring of data ``module.name``, where it is assigned.

  ``module`` re-exports it, so the assignment is in one of its (private)
  submodules, found by the identity of the object.
  """
  from sphinx.pycode import ModuleAnalyzer
  package = importlib.import_module(module)
  obj = getattr(package, name)
  candidates = [module] + [
      f"{module}.{m.name}" for m in pkgutil.iter_modules(
          getattr(package, "__path__", []))]
  for candidate in candidates:
    if getattr(importlib.import_module(candidate), name, None) is not obj:
      continue
    docs = ModuleAnalyzer.for_module(candidate).find_attr_docs()
    if ("", name) in docs:
      return inspect.cleandoc("\n".join(docs[("", name)]))
  return ""


def docstring(module: str, name: str) -> str:
  """What the API page shows for ``module.name``: its docstring, or for data
  its attribute docstring."""
  obj = getattr(importlib.import_module(module), name)
  if is_data(obj):
    return attribute_doc(module, name)
  return inspect.getdoc(obj) or ""


_SECTION = re.compile(r"^(Examples?):[ \t]*$", re.M)


def has_example(doc: str) -> bool:
  """Whether ``doc`` has an ``Example:``/``Examples:`` section (Google style,
  at the docstring's own indentation) holding a doctest."""
  for match in _SECTION.finditer(doc):
    body = []
    for line in doc[match.end():].split("\n")[1:]:
      if line.strip() and not line[0].isspace():
        break
      body.append(line)
    if any(line.lstrip().startswith(">>> ") for line in body):
      return True
  return False


def public_names() -> list[tuple[str, str]]:
  """``(module, name)`` of every documented name: each public subpackage's
  ``__all__``, modules left out (they have their own page)."""
  names = []
  for sub in public_subpackages():
    module = importlib.import_module(f"multirate_optax.{sub}")
    names += [(module.__name__, name) for name in module.__all__
              if not inspect.ismodule(getattr(module, name))]
  return names


def names_without_example() -> list[str]:
  """The public names whose rendered documentation has no example."""
  return [f"{module}.{name}" for module, name in public_names()
          if not has_example(docstring(module, name))]


def _entry(module: str, name: str, obj: object) -> str:
  kind = ("autoclass" if inspect.isclass(obj) else
          "autofunction" if callable(obj) else "autodata")
  options = "   :members:\n" if kind == "autoclass" else ""
  return f"```{{eval-rst}}\n.. {kind}:: {module}.{name}\n{options}```\n\n"


def write_api(out: Path) -> dict[str, str]:
  """Writes the API pages; returns where each public object is documented."""
  out.mkdir(parents=True, exist_ok=True)
  documented: dict[int, str] = {}
  home: dict[str, str] = {}
  missing, no_example = [], []
  for sub in public_subpackages():
    module = importlib.import_module(f"multirate_optax.{sub}")
    doc = inspect.getdoc(module) or ""
    lines = [f"# `multirate_optax.{sub}`\n\n", doc.split("\n\n")[0] + "\n\n"]
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.ismodule(obj):
        continue
      doc = docstring(f"multirate_optax.{sub}", name)
      if not doc.strip():
        missing.append(f"multirate_optax.{sub}.{name}")
      elif not has_example(doc):
        no_example.append(f"multirate_optax.{sub}.{name}")
      lines.append(_entry(f"multirate_optax.{sub}", name, obj))
      documented[id(obj)] = f"multirate_optax.{sub}.{name}"
      home[name] = sub
    (out / f"{sub}.md").write_text("".join(lines))
  top = ["# `multirate_optax`\n\n",
         "The names most users need, re-exported at the top level; each is "
         "documented in its subpackage.\n\n"]
  for name in multirate_optax.__all__:
    obj = getattr(multirate_optax, name)
    if inspect.ismodule(obj):
      top.append(f"- [`{name}`]({name}.md)\n" if name in public_subpackages()
                 else f"- `{name}`\n")
    elif id(obj) in documented:
      top.append(f"- {{py:obj}}`{name} <{documented[id(obj)]}>`\n")
    else:
      missing.append(f"multirate_optax.{name} (in no subpackage's __all__)")
  (out / "index.md").write_text("".join(top))
  if missing:
    raise RuntimeError("public names without documentation: "
                       + ", ".join(missing))
  if no_example:
    raise RuntimeError(
        "public names whose docstring has no 'Example:' section with a "
        "doctest (add one, Google style, as multirate_optax.multirate's): "
        + ", ".join(no_example))
  return home


def _data_doc(app, what, name, obj, options, lines):
  """Data re-exported by a subpackage: its attribute docstring, not its
  type's. Runs before napoleon, which then reads the ``Example:`` section."""
  if what != "data" or not name.startswith("multirate_optax."):
    return
  module, attr = name.rsplit(".", 1)
  doc = attribute_doc(module, attr)
  if doc:
    lines[:] = doc.split("\n")


def _message(node: ast.AST) -> str:
  """The literal words of a message expression, ``…`` for formatted parts."""
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return node.value
  if isinstance(node, ast.JoinedStr):
    return "".join(_message(v) if not isinstance(v, ast.FormattedValue)
                   else "…" for v in node.values)
  if isinstance(node, ast.BinOp):
    return _message(node.left) + _message(node.right)
  if isinstance(node, ast.Call) and node.args:
    return _message(node.args[0])
  return "…"


def write_error_index(path: Path) -> int:
  rows = []
  for file in sorted(PACKAGE.rglob("*.py")):
    module = ".".join(file.relative_to(PACKAGE.parent).with_suffix("").parts)
    for node in ast.walk(ast.parse(file.read_text())):
      if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
        kind = getattr(node.exc.func, "id", getattr(node.exc.func, "attr", "?"))
        text = _message(node.exc.args[0]) if node.exc.args else ""
      elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "warn"
            and node.args):
        kind, text = "warning", _message(node.args[0])
      else:
        continue
      text = " ".join(text.split()).replace("|", "\\|").replace("`", "'")
      if len(text) > 300:
        text = text[:300] + " …"
      rows.append(f"| `{module}` | {kind} | {text} |\n")
  path.write_text(
      "# Every error and warning, by module\n\n"
      "Generated from the source at build time (`…` marks the parts filled "
      "in at run time: leaf paths, shapes, values).\n\n"
      "| module | raises | message |\n|---|---|---|\n" + "".join(rows))
  return len(rows)


def setup(app):
  source = Path(app.srcdir)
  write_api(source / "api")
  write_error_index(source / "troubleshooting_index.md")
  # Before napoleon's handler (priority 500): lower priorities run first.
  app.connect("autodoc-process-docstring", _data_doc, priority=400)
  return {"parallel_read_safe": True}
