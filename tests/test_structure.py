"""The layering contract and the size limits of docs/design.md, and the generated flag tables.

- import-linter (`.importlinter`): each layer imports only from below; independent siblings
  do not import each other.
- tools/check_structure.py: no import cycle, no unexplained function-level import of megakd,
  no module over 500 lines, no function over 80 lines without a comment saying why.
- tools/flag_tables.py --check: the README's and docs/flags.md's flag tables match the
  declarations on the config fields and in the divergence registry.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import check_structure  # noqa: E402
import flag_tables  # noqa: E402


def test_import_linter_layers_hold():
    linter = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    proc = subprocess.run([linter, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_no_cycles_and_size_limits():
    report = check_structure.analyse(ROOT)
    assert report.largest_cycle == []
    assert report.violations == []


def test_flag_tables_are_generated_from_the_declarations():
    assert flag_tables.stale() == {}, "run python tools/flag_tables.py"
