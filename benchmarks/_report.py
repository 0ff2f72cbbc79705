"""What every benchmark does with its results: write them as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def write_json(report: Any, path: Optional[Path]) -> None:
  """Writes ``report`` to ``path`` (its folder made if needed), if given."""
  if path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
