"""The storage layout is spelled out in one module: `layout.py` gives every artifact's path, and no other module joins
the top-level folder names itself."""

import re
from pathlib import Path

from llm_platform.storage import layout

TOP = ("datasets", "corpora", "runs", "sweeps", "registry", "evals", "status")


def test_layout_paths_match_the_documented_tree():
    root = "s3://bucket/prefix"
    assert layout.dataset(root, "web", "abc123") == "s3://bucket/prefix/datasets/web/abc123"
    assert layout.sample_corpus(root, 400, 0) == "s3://bucket/prefix/corpora/sample-n400-s0/sample.jsonl"
    assert layout.run(root, "r1") == "s3://bucket/prefix/runs/r1" and layout.runs(root).endswith("/runs")
    assert layout.sweep(root, "s") == "s3://bucket/prefix/sweeps/s" and layout.sweeps(root).endswith("/sweeps")
    assert layout.registered_model(root, "m") == "s3://bucket/prefix/registry/m"
    assert layout.eval_metrics(root, "m", "3", "default") == "s3://bucket/prefix/evals/m/3/default/metrics.json"
    assert layout.last_run_status("store") == "store/status/last_run.json"
    documented = (Path(__file__).parents[2] / "docs" / "ARCHITECTURE.md").read_text()
    assert all(f"\n{name}/" in documented for name in TOP)  # the tree in ARCHITECTURE names every folder


def test_no_other_module_joins_the_top_level_folders():
    package = Path(layout.__file__).parent
    names = "|".join(TOP)
    pattern = re.compile(r"""storage\.join\([^)]*["'](""" + names + r""")["']""")
    offenders = [f"{p.relative_to(package)}:{i}" for p in package.rglob("*.py") if p.name != "layout.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
