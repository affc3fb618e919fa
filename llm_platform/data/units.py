"""Units of input pieces: how the stage groups the pieces into tasks (`plan_units`), and the driver's view across
units once they are read (skipped records numbered by their file's lines, each unit's duplicates)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from llm_platform.data.results import FileResult


def plan_units(sizes: list[int], target_bytes: int, min_units: int = 1) -> list[list[int]]:
    """The input pieces (`sources.pieces`: files, and byte ranges of large line-based files; by index, in listing
    order) grouped into units of consecutive pieces, one task each in every per-file phase: at most a share of about
    `target_bytes` a unit (a larger piece is a unit alone), and at least `min_units` units (or one per piece, if
    fewer), so the tasks keep every slot busy.

    A corpus of thousands of small files then costs what its bytes cost: each unit writes a handful of objects
    whatever its file count (one per file before, and a Ray task per file); a large JSONL file is read by several
    tasks. Which pieces share a unit changes no output: documents keep their ids (piece index << 32 | line) and
    every later phase reads units in file order."""
    total = sum(sizes)
    count = max(math.ceil(total / max(1, target_bytes)), min(len(sizes), min_units), 1)
    share = max(1.0, total / count)
    units: list[list[int]] = []
    unit: list[int] = []
    held = 0
    for i, size in enumerate(sizes):
        # A unit closes before a file that would take it past its share, or when the files left are only enough
        # to give each of the units still owed one.
        if unit and (held + size > share or len(sizes) - i <= count - len(units) - 1):
            units.append(unit)
            unit, held = [], 0
        unit.append(i)
        held += size
    return units + [unit] if unit else units


def piece_offsets(units: list[FileResult], pieces: list[dict]) -> dict[int, int]:
    """Each piece's first line in its file, less one: the lines of the file's earlier byte ranges (each range
    counted its lines from its own start, and reported how many it held: `range_lines`); 0 for a whole file."""
    lines = {p: n for u in units for p, n in u.range_lines.items()}
    offset, before = {}, 0
    for i, p in enumerate(pieces):
        if not p.get("range") or p["range"][0] == 0:
            before = 0
        offset[i] = before
        before += lines.get(i, 0)
    return offset


def with_file_lines(units: list[FileResult], offsets: dict[int, int]) -> list[FileResult]:
    """The units with their skipped records and dropped examples numbered by their file's lines, as one read of
    the file would number them (their `piece` dropped)."""

    def numbered(r: dict) -> dict:
        line = r["line"] + offsets.get(r.get("piece", -1), 0)
        return {**{k: v for k, v in r.items() if k != "piece"}, "line": line}

    return [dataclasses.replace(
        u, skipped=[numbered(r) for r in u.skipped],
        examples={reason: [numbered(r) for r in rs] for reason, rs in u.examples.items()}) for u in units]


def dups_by_unit(dup_ids: np.ndarray, units: list[FileResult]) -> list[np.ndarray]:
    """Each unit's duplicate doc ids (sorted), aligned with `units` (a doc id's high half is its piece index)."""
    ids = np.sort(dup_ids)
    starts = np.asarray([u.pieces[0] for u in units], np.int64)
    unit_of = np.searchsorted(starts, ids >> 32, side="right") - 1
    return [ids[unit_of == i] for i in range(len(units))]
