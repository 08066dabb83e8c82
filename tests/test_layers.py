"""The package's import layers and the docs site are checked like the code: `lint-imports`
(the contracts in pyproject.toml: the layers, the core free of Ray and MLflow, MLflow only
in tracking, the read path free of the converters, no import circles) and
`mkdocs build --strict` (a broken link or a page missing from the nav fails)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_import_contracts_are_kept():
    out = subprocess.run([BIN / "lint-imports"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "5 kept" in out.stdout, out.stdout[-2000:]


def test_docs_site_builds_strict(tmp_path):
    out = subprocess.run([BIN / "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; topics belong in docs/"
    dated = [line for line in lines if re.search(r"\b20\d\d-\d\d-\d\d\b", line)]
    assert not dated, f"dated lines belong in CHANGELOG.md or result records: {dated}"
