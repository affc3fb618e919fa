"""The data stage's summary table, from a manifest (console and manifest share it)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_platform.data.manifest import Manifest


def summary_table(manifest: Manifest) -> str:
    """A plain-text table: inputs, drops per reason, duplicates, splits, tokens, and a sample of skipped records."""
    from rich.console import Console
    from rich.table import Table

    counts = manifest["counts"]
    table = Table(title=f"dataset {manifest['name']} ({manifest['kind']}, seq_len {manifest['seq_len']})",
                  show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("input files", f"{counts['files']:,}")
    table.add_row("records read", f"{counts['records_in']:,}")
    for reason, n in sorted(counts["dropped"].items()):
        table.add_row(f"  dropped: {reason}", f"{n:,}")
    table.add_row("  exact duplicates", f"{counts['exact_duplicates']:,}")
    table.add_row("  near duplicates", f"{counts['near_duplicates']:,}")
    if counts.get("pii_replacements"):
        table.add_row("  PII replacements", f"{counts['pii_replacements']:,}")
    table.add_row("documents kept", f"{counts['documents_kept']:,}")
    for name, split in sorted(manifest["splits"].items()):
        table.add_row(f"{name}: documents / records", f"{split['documents']:,} / {split['num_records']:,}")
        table.add_row(f"{name}: tokens in blocks (+ remainder)",
                      f"{split['num_tokens']:,} (+{split['remainder_tokens']:,})")
        if split.get("skipped_prompt_too_long"):
            table.add_row(f"{name}: skipped prompt_too_long", f"{split['skipped_prompt_too_long']:,}")
    table.add_row("vocab size", f"{manifest['tokenizer']['vocab_size']:,}")
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=False, color_system=None)
    console.print(table)
    skipped = manifest.get("skipped") or []
    if skipped:
        console.print(f"first {len(skipped)} skipped records:")
        for s in skipped:
            console.print(f"  {s['source']}:{s['line']}: {s['reason']}", markup=False, highlight=False)
    return out.getvalue()
