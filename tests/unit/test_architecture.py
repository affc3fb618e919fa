"""The architecture's rules hold (`lint-imports`: the contracts in pyproject.toml), and the contracts cover what
docs/ARCHITECTURE.md says they cover: every top-level module has a layer, every module outside commands/ and config/
is kept from Hydra, and the Ray seams the contract allows are the ones the document's table lists."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llm_platform

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as mypy and CI run

REPO = Path(__file__).resolve().parents[2]
CONTRACTS = {c["name"].split(":")[0].split(" only")[0]: c
             for c in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]}


def _top_level_modules() -> set[str]:
    return {m.name for m in pkgutil.iter_modules(llm_platform.__path__) if m.name != "conf"}


def test_the_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint_imports), "--no-cache"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_every_top_level_module_has_a_layer():
    layered = {name.strip() for layer in CONTRACTS["Layers"]["layers"] for name in layer.split("|")}
    assert layered == _top_level_modules()


def test_every_module_but_commands_and_config_is_kept_from_hydra():
    kept = {m.removeprefix("llm_platform.") for m in CONTRACTS["Hydra"]["source_modules"]}
    assert kept == _top_level_modules() - {"commands", "config"}


def test_the_ray_seams_are_the_ones_the_document_lists():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = doc.split("## Where Ray is used", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]  # the table's rows, header left out
    documented = {"llm_platform." + path.removesuffix(".py").replace("/", ".")
                  for row in rows for path in re.findall(r"`([\w/]+\.py)`", row.split("|")[1])}
    allowed = {rule.split(" -> ")[0] for rule in CONTRACTS["Ray"]["ignore_imports"]}
    assert allowed == documented, (f"in the contract only: {sorted(allowed - documented)}; "
                                   f"in docs/ARCHITECTURE.md only: {sorted(documented - allowed)}")
