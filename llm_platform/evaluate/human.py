"""Human evaluation: export blinded, shuffled samples for rating, and import the ratings into win rates.

Export (a folder): `samples.csv` and `samples.jsonl` (sample_id, prompt, output_1[, output_2]; in the CSV a cell
that would start a spreadsheet formula is prefixed with `'`, the JSONL keeps the exact texts), `rating_sheet.html`
(a static page with one row per sample that saves `ratings.csv` in the browser), and `key.json`, which maps each
sample to the system behind each output. Raters never see key.json. With two systems, which one is output_1 is
drawn at random per sample, so position bias averages out.

Ratings (`ratings.csv`): `sample_id,preference` with 1, 2 or tie (two systems), or `sample_id,score` with 1-5 (one
system). Win rates count a tie as half a win; intervals are Wilson score intervals over the ratings.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import random
from statistics import NormalDist

from llm_platform.errors import DataError

KEY = "key.json"
# A cell starting with one of these is a formula in Excel, LibreOffice and Google Sheets (OWASP, CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A text cell that a spreadsheet shows as text: prefixed with `'` when it would start a formula, as OWASP
    advises (a model's output or a prompt is untrusted text, and raters open samples.csv in a spreadsheet)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def export_samples(prompts: list[str], systems: dict[str, list[str]], num_samples: int, seed: int,
                   folder: str) -> dict:
    """Write a blinded sample set for one or two systems ({label: outputs aligned with prompts})."""
    if not 1 <= len(systems) <= 2:
        raise ValueError("human evaluation rates one or two systems")
    rng = random.Random(seed)
    chosen = rng.sample(range(len(prompts)), min(num_samples, len(prompts)))
    labels = sorted(systems)
    rows, key = [], {}
    for n, idx in enumerate(chosen):
        order = labels[:]
        rng.shuffle(order)
        sid = f"s{n:04d}"
        row = {"sample_id": sid, "prompt": prompts[idx]}
        row.update({f"output_{k + 1}": systems[label][idx] for k, label in enumerate(order)})
        rows.append(row)
        key[sid] = order
    os.makedirs(folder, exist_ok=True)
    fields = ["sample_id", "prompt"] + [f"output_{k + 1}" for k in range(len(labels))]
    with open(os.path.join(folder, "samples.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)  # samples.jsonl keeps the text
    with open(os.path.join(folder, "samples.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, KEY), "w", encoding="utf-8") as f:
        json.dump({"mode": "pair" if len(labels) == 2 else "single", "systems": labels, "samples": key}, f, indent=2)
    with open(os.path.join(folder, "rating_sheet.html"), "w", encoding="utf-8") as f:
        f.write(rating_sheet(rows, pair=len(labels) == 2))
    return {"num_samples": len(rows), "folder": folder}


def rating_sheet(rows: list[dict], pair: bool) -> str:
    """A static HTML page: each sample with radio buttons, and a button that downloads ratings.csv."""
    esc = html.escape
    choices = ["1", "2", "tie"] if pair else ["1", "2", "3", "4", "5"]
    column = "preference" if pair else "score"
    body = []
    for r in rows:
        outs = "".join(f"<td><pre>{esc(r[k])}</pre></td>" for k in sorted(r) if k.startswith("output_"))
        radios = " ".join(f'<label><input type="radio" name="{esc(r["sample_id"])}" value="{c}">{c}</label>'
                          for c in choices)
        body.append(f"<tr><td>{esc(r['sample_id'])}</td><td><pre>{esc(r['prompt'])}</pre></td>{outs}"
                    f"<td>{radios}</td></tr>")
    heads = "<th>output 1</th><th>output 2</th>" if pair else "<th>output</th>"
    ask = "Which output is better?" if pair else "Rate the output from 1 (bad) to 5 (excellent)."
    script = (
        "function save(){const rows=[['sample_id','" + column + "']];"
        "const seen=new Set();document.querySelectorAll('input[type=radio]:checked').forEach(i=>{"
        "if(!seen.has(i.name)){seen.add(i.name);rows.push([i.name,i.value]);}});"
        "const blob=new Blob([rows.map(r=>r.join(',')).join('\\n')+'\\n'],{type:'text/csv'});"
        "const a=document.createElement('a');a.href=URL.createObjectURL(blob);a.download='ratings.csv';a.click();}"
    )
    style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}" \
            "pre{white-space:pre-wrap;max-width:420px;margin:0}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Rating sheet</title><style>{style}</style>"
            f"</head><body><h1>Rating sheet</h1><p>{ask} Then press <b>Save ratings</b> and send back "
            f"ratings.csv.</p><table><tr><th>id</th><th>prompt</th>{heads}<th>rating</th></tr>{''.join(body)}"
            f"</table><p><button onclick='save()'>Save ratings</button></p><script>{script}</script>"
            f"</body></html>\n")


def wilson(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (`successes` may be fractional when ties count half)."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def import_ratings(ratings_uri: str, key_uri: str, confidence: float = 0.95) -> dict:
    """Read ratings.csv against the export's key.json; every bad row names the file and line."""
    from llm_platform import storage

    if not storage.exists(key_uri):
        raise DataError(f"no export key at {key_uri}: set eval.human.export_uri to the folder of the export")
    key = storage.read_json(key_uri)
    pair = key["mode"] == "pair"
    column = "preference" if pair else "score"
    reader = csv.DictReader(io.StringIO(storage.read_text(ratings_uri)))
    if "sample_id" not in (reader.fieldnames or []) or column not in (reader.fieldnames or []):
        raise DataError(f"{ratings_uri}: expected columns sample_id,{column}")
    wins = {s: 0.0 for s in key["systems"]}
    ties, scores, n = 0, [], 0
    for row in reader:
        line, sid, value = reader.line_num, (row["sample_id"] or "").strip(), (row[column] or "").strip().lower()
        if sid not in key["samples"]:
            raise DataError(f"{ratings_uri}:{line}: unknown sample_id {sid!r}")
        if pair:
            if value not in ("1", "2", "tie"):
                raise DataError(f"{ratings_uri}:{line}: preference must be 1, 2 or tie, got {value!r}")
            if value == "tie":
                ties += 1
                for s in wins:
                    wins[s] += 0.5
            else:
                wins[key["samples"][sid][int(value) - 1]] += 1
        else:
            if value not in ("1", "2", "3", "4", "5"):
                raise DataError(f"{ratings_uri}:{line}: score must be 1-5, got {value!r}")
            scores.append(int(value))
        n += 1
    if n == 0:
        raise DataError(f"{ratings_uri}: no ratings")
    metrics: dict[str, float] = {"num_ratings": float(n)}
    if pair:
        for s, w in wins.items():
            low, high = wilson(w, n, confidence)
            metrics.update({f"{s}_win_rate": w / n, f"{s}_win_rate_ci_low": low, f"{s}_win_rate_ci_high": high})
        metrics["tie_rate"] = ties / n
    else:
        mean = sum(scores) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / max(n - 1, 1))
        half = NormalDist().inv_cdf(0.5 + confidence / 2) * sd / math.sqrt(n)
        metrics.update({"mean_score": mean, "mean_score_ci_low": mean - half, "mean_score_ci_high": mean + half})
    return {"metrics": metrics, "systems": key["systems"], "mode": key["mode"]}
