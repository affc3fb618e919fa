"""The data stage's typed task results: their JSON markers (what a resumed run reads back), the driver's renumbering
of skipped records, and the phase timings the executor returns instead of filling an accumulator."""

import dataclasses
import json

import numpy as np

from llm_platform.data.executor import PhaseRunner, Ran, in_process
from llm_platform.data.results import Duplicates, EncodedUnit, FileResult, ShardResult
from llm_platform.data.units import dups_by_unit, piece_offsets, with_file_lines


def _through_json(record: dict) -> dict:
    return json.loads(json.dumps(record, sort_keys=True))


def test_a_file_result_comes_back_from_its_marker_as_resumed():
    unit = FileResult("000002-000003", (2, 3), records=5, kept=3, dropped={"empty": 2}, pii_replacements=1,
                      skipped=[{"source": "a", "line": 4, "reason": "empty", "piece": 3}], range_lines={2: 7, 3: 4},
                      dropped_by_file={"a": {"empty": 2}}, examples={"empty": []},
                      languages={"detected": {"en": 5}, "kept": {"en": 3}}, key_runs=[{"uri": "k", "parts": {}}],
                      sig_runs=[])
    marker = _through_json(unit.to_json())
    assert "resumed" not in marker and marker["range_lines"] == {"2": 7, "3": 4} and marker["pieces"] == [2, 3]
    assert FileResult.from_json(marker) == dataclasses.replace(unit, resumed=True)
    older = {k: v for k, v in marker.items() if k not in ("range_lines", "dropped_by_file", "examples", "languages")}
    assert FileResult.from_json(older).languages == {"detected": {}, "kept": {}}  # a marker from an older run


def test_shard_and_encoded_results_leave_out_what_they_do_not_have():
    shard = ShardResult("val-00001", "val", "val/part-00001.parquet", documents=2, token_counts=[0, 2],
                        length_hist=[1], chat={"truncated": 1})
    marker = _through_json(shard.to_json())
    assert not {"row_groups", "packing", "mixture", "resumed"} & set(marker)
    assert ShardResult.from_json(marker) == dataclasses.replace(shard, resumed=True)
    written = dataclasses.replace(shard, records=3, row_groups=[[3, 1]], mixture={"0": [2, 9]})
    assert ShardResult.from_json(_through_json(written.to_json())).row_groups == [[3, 1]]
    assert "mixture" not in EncodedUnit("u", []).to_json()
    assert EncodedUnit.from_json({"unit": "u", "runs": [], "mixture": {"shape": [1]}}).mixture == {"shape": [1]}


def test_skipped_records_are_numbered_by_their_files_lines_without_touching_the_units():
    pieces = [{"uri": "a", "range": [0, 10]}, {"uri": "a", "range": [10, 20]}, {"uri": "b", "range": None}]
    first = FileResult("000000-000000", (0, 0), range_lines={0: 6},
                       skipped=[{"source": "a", "line": 2, "reason": "x", "piece": 0}])
    second = FileResult("000001-000002", (1, 2), range_lines={1: 3},
                        skipped=[{"source": "a", "line": 1, "reason": "x", "piece": 1},
                                 {"source": "b", "line": 5, "reason": "y", "piece": 2}],
                        examples={"y": [{"source": "b", "line": 5, "text": "t", "piece": 2}]})
    offsets = piece_offsets([first, second], pieces)
    assert offsets == {0: 0, 1: 6, 2: 0}
    numbered = with_file_lines([first, second], offsets)
    assert [r["line"] for u in numbered for r in u.skipped] == [2, 7, 5]
    assert all("piece" not in r for u in numbered for r in u.skipped)
    assert numbered[1].examples == {"y": [{"source": "b", "line": 5, "text": "t"}]}
    assert second.skipped[0] == {"source": "a", "line": 1, "reason": "x", "piece": 1}  # the task's result as it was


def test_duplicates_are_handed_to_the_unit_that_holds_them():
    units = [FileResult("000000-000001", (0, 1)), FileResult("000002-000002", (2, 2))]
    dups = Duplicates(np.asarray([(2 << 32) | 4, 1 << 32, 3], np.int64), np.zeros(3, np.int64), np.ones(3, bool))
    got = dups_by_unit(dups.doc_id, units)
    assert [g.tolist() for g in got] == [[3, 1 << 32], [(2 << 32) | 4]]


def _square(x: int) -> int:
    return x * x


def test_phase_timings_add_up_what_the_executor_reports():
    def executor(fn, items, *, num_cpus, **kwargs):
        return Ran([fn(*item) for item in items], cpu_s=0.5 * len(items), wall_s=1.0 * len(items))

    runner = PhaseRunner(executor, timings={"list_s": 0.1})
    assert runner.timed("first", lambda: runner.tasks(_square, [(2,), (3,)], num_cpus=1)) == [4, 9]
    runner.timed("second", lambda: runner.tasks(_square, [(4,)], num_cpus=1))
    assert runner.timings["first_tasks_cpu_s"] == 1.0 and runner.timings["first_tasks_wall_s"] == 2.0
    assert runner.timings["second_tasks_cpu_s"] == 0.5 and runner.timings["list_s"] == 0.1
    ran = in_process(_square, [(5,), (6,)], num_cpus=1)
    assert ran.values == [25, 36] and ran.cpu_s >= 0.0 and ran.wall_s >= 0.0
