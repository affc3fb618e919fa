"""The rule sets' part of the data stage's console report: languages detected and kept, and the first dropped
documents of each drop reason (the summary table, report.py, already has a row per reason)."""

from __future__ import annotations

import io
from typing import Any


def filter_report(manifest: Any) -> str:
    """Languages (detected / kept, most frequent first) and each reason's examples, from a manifest; "" when the
    manifest has neither."""
    from rich.console import Console
    from rich.table import Table

    languages = (manifest.get("counts") or {}).get("languages") or {}
    examples = manifest.get("filter_examples") or {}
    if not languages.get("detected") and not examples:
        return ""
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=False, color_system=None)
    detected, kept = languages.get("detected") or {}, languages.get("kept") or {}
    if detected:
        table = Table(title="languages", caption="kept: passed every rule (before dedup)")
        table.add_column("language")
        table.add_column("detected", justify="right")
        table.add_column("kept", justify="right")
        for lang, n in sorted(detected.items(), key=lambda kv: (-kv[1], kv[0])):
            table.add_row(lang, f"{n:,}", f"{kept.get(lang, 0):,}")
        console.print(table)
    for reason in sorted(examples):
        console.print(f"dropped by {reason}, first {len(examples[reason])}:", markup=False, highlight=False)
        for e in examples[reason]:
            snippet = e["text"][:120].replace("\n", " | ")
            lang = f" [{e['language']} {e['language_score']:.2f}]" if e.get("language") else ""
            console.print(f"  {e['source']}:{e['line']}{lang}: {snippet}", markup=False, highlight=False,
                          soft_wrap=True)
    return out.getvalue()
