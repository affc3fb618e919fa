"""The test suite needs nothing outside the repository: it passes in a clone placed anywhere (issue #19).

Two checks. No test or benchmark source builds a path outside the checkout (its parent folder, a home directory, a
machine-specific absolute path); scratch space under /tmp is allowed, it is not an input. And the tests that read the
repository's data files (the manifests against the KubeRay CRDs, terraform/, conf/) pass, run with this interpreter,
in a copy of the repository's files placed in an empty temporary folder, where a path leaving the checkout finds
nothing.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Build outputs and local state that a clone does not have (the fallback when there is no git checkout).
NOT_IN_A_CLONE = (".git", ".venv*", "__pycache__", ".pytest_cache", "*.egg-info", ".llm-platform", "outputs",
                  "multirun", "build", "dist")
# Absolute paths that name one machine's layout, and home-relative ones. /tmp is scratch space every POSIX machine
# has, and other absolute paths in tests are data (a fake file name in a mocked error), not places read from.
MACHINE_SPECIFIC = re.compile(r"^(/(home|root|Users|work|mnt|shared)(/|$)|~/)")
# The test files that read data files of the repository, run in the copy. checkov's test is left out: it reads
# only terraform/, which test_terraform.py's other tests read too, and it takes 15-20 s of a small machine.
DATA_FILE_TESTS = ["tests/unit/test_kuberay_manifests.py", "tests/unit/test_terraform.py"]
DESELECT = ["tests/unit/test_terraform.py::test_checkov_finds_no_failed_checks"]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _file_anchor_depth(node: ast.AST) -> int | None:
    """N for `Path(__file__)[.resolve()].parents[N]` or `...parent.parent` (N parents), else None."""
    steps = 0
    while True:
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            steps, node = steps + 1, node.value
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
              and node.value.attr == "parents" and isinstance(node.slice, ast.Constant)):
            steps, node = steps + node.slice.value + 1, node.value.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "resolve":
            node = node.func.value
        else:
            break
    is_file = (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Path"
               and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "__file__")
    return steps if is_file and steps else None


def _outside_paths(path: Path, source: str | None = None) -> list[str]:
    """Places in one Python source (the file at `path`, or `source` as if it were there) that build a path outside
    the repository."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    docstrings = _docstrings(tree)
    depth_in_repo = len(path.relative_to(REPO).parts)  # .parent steps from the file to the root (parents[n]: n+1)
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        steps = _file_anchor_depth(node)
        if steps is not None and steps > depth_in_repo:
            found.append(f"{where}: {steps} levels above {path.name} is outside the repository")
        if isinstance(node, ast.Attribute) and node.attr == "parent" and isinstance(node.value, ast.Name) \
                and node.value.id in {"REPO", "ROOT", "REPO_ROOT"}:
            found.append(f"{where}: {node.value.id}.parent is outside the repository")
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"home", "expanduser"}:
                found.append(f"{where}: {name}() reads the home directory")
            if name in {"getenv", "get"} and node.args and isinstance(node.args[0], ast.Constant) \
                    and node.args[0].value == "HOME":
                found.append(f"{where}: reads $HOME")
            if name in {"Path", "join", "open", "PurePath"}:
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) \
                            and (arg.value == ".." or arg.value.startswith("../")):
                        found.append(f"{where}: {arg.value!r} climbs out of a folder")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and isinstance(node.right.value, str) and node.right.value.split("/")[0] == "..":
            found.append(f"{where}: / {node.right.value!r} climbs out of a folder")
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "HOME":
            found.append(f"{where}: reads $HOME")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if MACHINE_SPECIFIC.match(node.value):
                found.append(f"{where}: machine-specific path {node.value!r}")
    return found


def test_no_test_or_benchmark_builds_a_path_outside_the_repository():
    sources = sorted((REPO / "tests").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))
    assert len(sources) > 20, "the scan found too few files to mean anything"
    found = [hit for path in sources for hit in _outside_paths(path)]
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def test_the_scan_sees_each_kind_of_outside_path():
    """The scanner itself: each pattern it exists for is reported, and paths inside the repository are not."""
    probe = REPO / "tests" / "unit" / "probe.py"  # never written: only its place in the tree matters
    cases = {
        "REPO.parent / 'shared'": True,
        "Path(__file__).resolve().parents[3]": True,
        "Path(__file__).parent.parent.parent.parent": True,
        "Path.home() / '.cache'": True,
        "os.path.expanduser('~/.ray')": True,
        "os.environ['HOME']": True,
        "Path('/work/shared/kuberay-crds')": True,
        "open('/home/me/corpus.jsonl')": True,
        "Path(__file__).resolve().parents[2] / '..' / 'shared'": True,
        "Path('../shared')": True,
        "REPO / '..' / 'shared'": True,
        "Path(__file__).resolve().parents[2] / 'cluster'": False,
        "tempfile.mkdtemp(dir='/tmp')": False,
        "registry.register(root, '../evil')": False,
    }
    for source, outside in cases.items():
        hits = _outside_paths(probe, source)
        assert bool(hits) is outside, f"{source!r}: {hits}"


def _repository_files() -> list[Path]:
    """The files a clone has: tracked ones plus new ones git does not ignore (not yet committed, but meant to be)."""
    git = shutil.which("git")
    if git and (REPO / ".git").exists():
        out = subprocess.run([git, "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        return [REPO / name for name in out.decode().split("\0") if name and (REPO / name).is_file()]
    skip = shutil.ignore_patterns(*NOT_IN_A_CLONE)
    files = []
    for folder, dirs, names in os.walk(REPO):
        ignored = skip(folder, dirs + names)
        dirs[:] = [d for d in dirs if d not in ignored]
        files += [Path(folder) / n for n in names if n not in ignored]
    return files


def test_data_file_tests_pass_in_a_copy_with_nothing_beside_it(tmp_path):
    clone = tmp_path / "llm-platform"  # tmp_path is empty: nothing lies beside the copy
    for path in _repository_files():
        target = clone / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    assert (clone / "cluster" / "crds" / "ray.io_rayclusters.yaml").is_file(), "the CRDs are not part of the repo"
    # Not this run's: its config path, its xdist worker identity, its reliability-figures file.
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLM_PLATFORM_CONF", "PYTHONPATH", "LLMP_FIGURES_FILE") and not k.startswith("PYTEST_XDIST")}
    # The copy's own package and conf/ must be the ones imported (the working folder comes first on sys.path).
    probe = subprocess.run([sys.executable, "-c", "import llm_platform.config as c; print(c.conf_dir())"],
                           cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert Path(probe.stdout.strip()).resolve().is_relative_to(clone.resolve()), probe.stdout
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DATA_FILE_TESTS]
    for test_id in DESELECT:
        cmd += ["--deselect", test_id]
    proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"the data-file tests fail in a copy of the repository:\n{tail}"
    assert re.search(r"\b\d+ passed\b", proc.stdout) and not re.search(r"\b(failed|error)", proc.stdout), tail
