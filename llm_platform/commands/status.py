"""`llm-platform status [overrides]`: the last `llm-platform run` and its lineage chain, from storage."""

import json
import sys


def main() -> None:
    from llm_platform import storage
    from llm_platform.config import compose
    from llm_platform.runner import STAGES
    from llm_platform.storage import layout

    overrides = [a for a in sys.argv[1:] if "=" in a]
    cfg = compose("run", overrides)
    storage.configure(cfg.storage)
    uri = layout.last_run_status(cfg.storage.root)
    if not storage.exists(uri):
        print(f"no run recorded under {cfg.storage.root} yet: start one with `llm-platform run`", file=sys.stderr)
        raise SystemExit(1)
    record = storage.read_json(uri)
    print(f"last run finished at {record['finished_at']}")
    # Records are stored with sorted keys: list the stages in the order they run.
    stages = sorted(record["stages"].items(), key=lambda kv: STAGES.index(kv[0]) if kv[0] in STAGES else len(STAGES))
    for name, rec in stages:
        print(f"  {name:<9} {rec['result']:<8} {rec['seconds']:>7.1f}s  {rec.get('output') or ''}")
    print("lineage:")
    for key, value in record["chain"].items():
        print(f"  {key:<20} {value}")
    if record.get("sample"):
        print("sample: " + json.dumps(record["sample"]))
