"""The documentation: the site builds with zero warnings, every public name
has an entry, and every Python code block of the pages and the README runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


def test_every_public_name_has_a_rendered_entry(built):
  import importlib
  import inspect
  sys.path.insert(0, str(ROOT / "docs" / "_ext"))
  from generated_pages import public_subpackages
  _, out = built
  for sub in public_subpackages():
    page = (out / "api" / f"{sub}.html").read_text()
    module = importlib.import_module(f"multirate_optax.{sub}")
    for name in module.__all__:
      if not inspect.ismodule(getattr(module, name)):
        assert f'id="multirate_optax.{sub}.{name}"' in page, (sub, name)


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
