"""Cost meters and budgets (train/budget.py, tune/budget.py) against arithmetic written out here, with fake clocks
and fake Tune objects (no Ray started)."""

from __future__ import annotations

import logging
import math
import pickle

import pytest

from llm_platform.config.prices import PricesConfig
from llm_platform.config.train import BudgetConfig
from llm_platform.config.tune import TuneBudgetConfig
from llm_platform.errors import ConfigError
from llm_platform.train.budget import CostMeter, Spend, check_budget, over_budget, price_placement
from llm_platform.train.checkpoint import TrainState
from llm_platform.train.metrics import Throughput
from llm_platform.train.reader import DataPosition

PRICES = PricesConfig()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_gpu_run_costs_its_gpus_hours_at_the_table_price_plus_what_it_had_spent():
    placement = price_placement(PRICES, device="NVIDIA H100 80GB HBM3", world=2, cpus_per_worker=8,
                                budget=BudgetConfig())
    per_gpu = 55.04 / 8  # a p5.48xlarge's eighth, the default table's cheapest H100
    assert placement.num_gpus == 2 and placement.usd_per_hour == pytest.approx(2 * per_gpu)
    clock = Clock()
    meter = CostMeter(placement, saved=Spend(hours=1.0, gpu_hours=2.0, cost_usd=10.0), clock=clock)
    clock.now += 1.5 * 3600
    spent = meter.spend()
    assert spent.hours == pytest.approx(2.5)
    assert spent.gpu_hours == pytest.approx(2.0 + 3.0)
    assert spent.cost_usd == pytest.approx(10.0 + 3.0 * per_gpu)


def test_a_cpu_run_costs_its_vcpus_and_holds_no_gpu_hours():
    placement = price_placement(PRICES, device=None, world=3, cpus_per_worker=2, budget=BudgetConfig())
    assert placement.num_gpus == 0 and placement.num_cpus == 6
    assert placement.usd_per_hour == pytest.approx(6 * PRICES.cpu.on_demand_usd_per_hour)
    clock = Clock()
    meter = CostMeter(placement, clock=clock)
    clock.now += 3600
    assert meter.spend().gpu_hours == 0.0
    assert meter.spend().cost_usd == pytest.approx(6 * 0.0446)
    assert over_budget(meter.spend(), BudgetConfig(max_gpu_hours=0.001)) is None  # no GPU-hours on CPUs


def test_a_device_without_a_price_is_unpriced_unless_a_dollar_budget_needs_one(caplog):
    with caplog.at_level(logging.WARNING, logger="llm_platform.train"):
        placement = price_placement(PRICES, device="Mystery GPU 9000", world=1, cpus_per_worker=1,
                                    budget=BudgetConfig(max_gpu_hours=5))
    assert math.isnan(placement.usd_per_hour) and "not tracked" in caplog.text
    assert "no price in plan.prices" in placement.describe()
    assert Spend(cost_usd=math.nan).to_json()["cost_usd"] is None
    with pytest.raises(ConfigError, match=r"train\.budget\.max_cost_usd=3.0 needs a price.*Mystery GPU 9000"):
        price_placement(PRICES, device="Mystery GPU 9000", world=1, cpus_per_worker=1,
                        budget=BudgetConfig(max_cost_usd=3.0))


@pytest.mark.parametrize("spend, budget, reason", [
    (Spend(cost_usd=0.99), BudgetConfig(max_cost_usd=1.0), None),
    (Spend(cost_usd=1.0), BudgetConfig(max_cost_usd=1.0), "train.budget.max_cost_usd=1"),
    (Spend(gpu_hours=7.9), BudgetConfig(max_gpu_hours=8), None),
    (Spend(gpu_hours=8.0), BudgetConfig(max_gpu_hours=8), "train.budget.max_gpu_hours=8"),
    (Spend(cost_usd=1e9, gpu_hours=1e9), BudgetConfig(), None),
])
def test_over_budget_names_the_limit_reached(spend, budget, reason):
    got = over_budget(spend, budget)
    assert got == reason if reason is None else reason in got


@pytest.mark.parametrize("key, value", [("max_cost_usd", 0.0), ("max_cost_usd", -1.0), ("max_gpu_hours", math.nan)])
def test_a_limit_must_be_a_positive_number(key, value):
    with pytest.raises(ConfigError, match=rf"train\.budget\.{key}="):
        check_budget(BudgetConfig(**{key: value}))


def test_the_spend_travels_in_the_checkpoint_and_old_checkpoints_read_as_nothing_spent():
    position = DataPosition(epoch=0, batches_in_epoch=3, rows_per_batch=4, data_partitions=4)
    state = TrainState(step=3, tokens=384, data=position, spend=Spend(hours=0.5, gpu_hours=4.0, cost_usd=13.76))
    back = TrainState.from_json(state.to_json(), rows_per_batch=4, data_partitions=4)
    assert back == state
    old = {k: v for k, v in state.to_json().items() if k not in ("hours", "gpu_hours", "cost_usd")}
    assert TrainState.from_json(old, rows_per_batch=4, data_partitions=4).spend == Spend()


def test_throughput_reports_seconds_per_step():
    meter = Throughput(flops_per_token=6.0, peak_flops=None, num_devices=1)
    meter.start -= 2.0  # two seconds ago
    meter.add(100)
    meter.add(100)
    out = meter.measure()
    assert out["perf/step_time_s"] == pytest.approx(1.0, rel=0.05)
    assert "perf/step_time_s" not in meter.measure()  # no step in the new interval


# ---- the sweep's budget (tune/budget.py imports Ray Tune's base classes, not a running Ray)

def test_sweep_spend_adds_trials_and_the_runs_a_trial_restarted(tmp_path):
    from llm_platform.tune.budget import SweepSpend

    spend = SweepSpend(TuneBudgetConfig(max_cost_usd=10.0), str(tmp_path))
    spend.add("a", {"cost/usd": 2.0, "cost/gpu_hours": 1.0})
    spend.add("a", {"cost/usd": 3.0, "cost/gpu_hours": 1.5})  # the same run, later
    spend.add("b", {"cost/usd": 4.0, "cost/gpu_hours": 2.0})
    spend.add("b", {"val/loss": 1.0})  # no cost figures: nothing changes
    assert spend.total() == {"usd": 7.0, "gpu_hours": 3.5} and spend.reached() is None
    spend.add("a", {"cost/usd": 1.0, "cost/gpu_hours": 0.5})  # a new run of trial a (PBT): its first one is kept
    assert spend.total() == {"usd": 8.0, "gpu_hours": 4.0}
    spend.add("b", {"cost/usd": 6.0, "cost/gpu_hours": 3.0})
    assert "tune.budget.max_cost_usd=10" in spend.reached()
    # A resumed sweep (a new object, or the one Tune unpickles) goes on from the record in the sweep folder.
    assert SweepSpend(spend.budget, str(tmp_path)).total() == spend.total()
    assert pickle.loads(pickle.dumps(spend)).total() == spend.total()


class FakeSearch:
    """The part of a Tune SearchAlgorithm that BudgetedSearch delegates to."""

    searcher = "the inner searcher"

    def __init__(self):
        self.results, self.handed = [], 0

    def next_trial(self):
        self.handed += 1
        return f"trial-{self.handed}"

    def on_trial_result(self, trial_id, result):
        self.results.append((trial_id, result))

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass

    def is_finished(self):
        return False


def test_budgeted_search_hands_out_no_trial_once_reached_and_the_stopper_waits_for_a_checkpoint(tmp_path):
    from llm_platform.tune.budget import BudgetedSearch, BudgetStopper, SweepSpend

    spend = SweepSpend(TuneBudgetConfig(max_gpu_hours=2.0), str(tmp_path))
    inner = FakeSearch()
    search, stopper = BudgetedSearch(inner, spend), BudgetStopper(spend)
    assert search.searcher == "the inner searcher"  # Tune inspects it (pending-trial limits)
    assert search.next_trial() == "trial-1" and not search.is_finished()
    assert stopper("trial-1", {"cost/gpu_hours": 1.0, "budget/can_stop": 1}) is False  # within budget
    search.on_trial_result("trial-1", {"cost/gpu_hours": 2.5, "budget/can_stop": 0})
    assert inner.results[-1][0] == "trial-1"
    assert search.next_trial() is None and search.is_finished() and inner.handed == 1
    assert stopper("trial-1", {"cost/gpu_hours": 2.6, "budget/can_stop": 0}) is False  # no checkpoint: run on
    assert stopper("trial-1", {"cost/gpu_hours": 2.7, "budget/can_stop": 1}) is True
    assert stopper.stop_all() is False
