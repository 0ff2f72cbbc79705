"""The documentation: the site builds with zero warnings, every public name
has an entry with its example, and every Python code block of the pages and
the README runs."""

import doctest
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
import generated_pages  # noqa: E402  (docs/_ext is no package)

PAGES = sorted((ROOT / "docs").rglob("*.md"))
PAGES = [p for p in PAGES if "_build" not in p.parts and "api" not in p.parts]
BLOCKS = [(page, number, code)
          for page in [*PAGES, ROOT / "README.md"]
          for number, code in enumerate(
              re.findall(r"^```python\n(.*?)^```", page.read_text(),
                         re.S | re.M))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp("html")
  done = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
       "html", str(ROOT / "docs"), str(out)],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  return done, out


def test_the_site_builds_with_zero_warnings(built):
  done, out = built
  assert done.returncode == 0, done.stderr
  assert done.stderr.strip() == ""
  assert (out / "index.html").is_file()


def test_every_public_name_has_an_example():
  # Fast (no build): the docstring the API page shows, of every name in a
  # public subpackage's __all__, has an Example section with a doctest; the
  # top-level names are documented there.
  import multirate_optax
  names = generated_pages.public_names()
  assert len(names) > 50, names
  documented = {id(getattr(sys.modules[module], name))
                for module, name in names}
  assert not [name for name in multirate_optax.__all__
              if not inspect.ismodule(getattr(multirate_optax, name))
              and id(getattr(multirate_optax, name)) not in documented]
  missing = generated_pages.names_without_example()
  assert not missing, (
      f"{len(missing)} public names have no 'Example:' section with a "
      f"doctest in their docstring: {missing}")


def test_has_example_reads_the_section():
  has = generated_pages.has_example
  assert has("Sums.\n\nExample:\n  >>> 1 + 1\n  2\n")
  assert has("Sums.\n\nArgs:\n  x: a.\n\nExamples:\n  Two:\n\n  >>> 2\n  2\n")
  assert not has("Sums.\n\nExample:\n  sum([1, 2])\n")
  assert not has("Sums.\n\nExample:\n  see below.\n\nReturns:\n  >>> 2\n")
  assert not has("Sums, for example:\n\n  >>> 2\n  2\n")


@pytest.mark.parametrize("module, name", [
    (module, name) for module, name in generated_pages.public_names()
    if generated_pages.is_data(getattr(sys.modules[module], name))])
def test_the_example_of_a_data_constant_runs(module, name):
  # pytest's doctest-modules reads docstrings of functions, classes and
  # modules; a constant's attribute docstring is run here.
  doc = generated_pages.attribute_doc(module, name)
  test = doctest.DocTestParser().get_doctest(doc, {}, f"{module}.{name}",
                                             None, 0)
  assert test.examples, f"{module}.{name} has no doctest"
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  result = runner.run(test, out=lambda text: pytest.fail(text))
  assert result.failed == 0 and result.attempted == len(test.examples)


def test_every_public_name_has_a_rendered_entry(built):
  _, out = built
  for sub in generated_pages.public_subpackages():
    page = (out / "api" / f"{sub}.html").read_text()
    module = importlib.import_module(f"multirate_optax.{sub}")
    for name in module.__all__:
      if inspect.ismodule(getattr(module, name)):
        continue
      anchor = f'id="multirate_optax.{sub}.{name}"'
      assert anchor in page, (sub, name)
      # The entry's own text runs up to the next entry or, in a class, its
      # first member; napoleon renders the Example section as a rubric.
      start = page.index(anchor)
      own = page[start:page.find('<dl class="py', start)]
      assert re.search(r'class="rubric">Examples?<', own), (
          f"multirate_optax.{sub}.{name}: no rendered example")


def test_every_page_is_reachable(built):
  _, out = built
  for page in PAGES:
    relative = page.relative_to(ROOT / "docs").with_suffix(".html")
    assert (out / relative).is_file(), relative


@pytest.mark.parametrize(
    "page, number, code", BLOCKS,
    ids=[f"{p.relative_to(ROOT)}#{n}" for p, n, _ in BLOCKS])
def test_code_block_runs(page, number, code):
  # Each block is self-contained: a fresh process, as a reader pastes it, with
  # 8 emulated CPU devices for the multi-device guide's recipe.
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=300, cwd=ROOT, env=env)
  assert done.returncode == 0, (
      f"{page.relative_to(ROOT)} block {number} failed:\n{done.stderr}")
