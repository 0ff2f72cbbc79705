"""Pages written at build time from the code, so that they cannot go stale.

* ``api/<subpackage>.md``: one autodoc entry per name in each public
  subpackage's ``__all__`` (subpackages are discovered, so a new one gets its
  page without editing the docs); the top-level names link to them.
* ``troubleshooting_index.md``: every ``raise`` and ``warnings.warn`` in the
  package, with the module, the exception type and the message's words.

A public name without a docstring fails the build.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import multirate_optax

PACKAGE = Path(multirate_optax.__file__).parent


def public_subpackages() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(multirate_optax.__path__)
                if m.ispkg and not m.name.startswith("_"))


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
  missing = []
  for sub in public_subpackages():
    module = importlib.import_module(f"multirate_optax.{sub}")
    doc = inspect.getdoc(module) or ""
    lines = [f"# `multirate_optax.{sub}`\n\n", doc.split("\n\n")[0] + "\n\n"]
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.ismodule(obj):
        continue
      if not (inspect.getdoc(obj) or "").strip():
        missing.append(f"multirate_optax.{sub}.{name}")
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
  return home


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
  return {"parallel_read_safe": True}
