"""The price table and the cost of a placement (llm_platform/costs.py, llm_platform/config/prices.py)."""

import datetime
import math
import random

import pytest

from llm_platform.config.prices import InstancePriceConfig, Market, PricesConfig
from llm_platform.costs import check_prices, gpu_hour_usd, placement_cost_usd
from llm_platform.errors import ConfigError
from llm_platform.models.flops import PEAKS


def test_the_table_prices_every_gpu_of_the_peaks_table_in_both_markets_and_is_dated():
    prices = PricesConfig()
    check_prices(prices)
    datetime.date.fromisoformat(prices.as_of_date)
    assert set(PEAKS) <= set(prices.gpus)
    for name, gpu in prices.gpus.items():
        assert 0 < gpu.spot_usd_per_hour <= gpu.on_demand_usd_per_hour, name
    for name, instance in prices.instances.items():
        assert instance.gpu_type in prices.gpus, name
    for name in ("g5.xlarge", "g6.xlarge", "g6e.xlarge", "p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge",
                 "p5e.48xlarge"):
        assert name in prices.instances


def test_a_gpu_costs_the_cheapest_per_gpu_instance_that_carries_it():
    prices = PricesConfig()
    for gpu, price in prices.gpus.items():
        carriers = [i for i in prices.instances.values() if i.gpu_type == gpu]
        assert price.on_demand_usd_per_hour == min(i.on_demand_usd_per_hour / i.num_gpus for i in carriers)
        assert price.spot_usd_per_hour == min(i.spot_usd_per_hour / i.num_gpus for i in carriers)
    p5 = prices.instances["p5.48xlarge"]
    assert prices.gpus["H100"].on_demand_usd_per_hour == pytest.approx(p5.on_demand_usd_per_hour / 8)
    assert prices.gpus["A10G"].on_demand_usd_per_hour == prices.instances["g5.xlarge"].on_demand_usd_per_hour


def test_placement_cost_is_gpus_times_hours_times_the_table_price():
    # Inputs generated, not chosen; the reference is the plain product read off the table.
    prices = PricesConfig()
    rng = random.Random(0)
    for _ in range(200):
        gpu = rng.choice(sorted(prices.gpus))
        market = rng.choice(list(Market))
        count, hours = rng.randint(1, 64), rng.uniform(0, 500)
        reference = count * hours * getattr(prices.gpus[gpu], f"{market.value}_usd_per_hour")
        cost = placement_cost_usd(prices, gpu_type=gpu, num_gpus=count, hours=hours, market=market)
        assert cost == pytest.approx(reference)
        # Accumulating it over pieces of the run gives the same total.
        split = rng.uniform(0, hours)
        pieces = [placement_cost_usd(prices, gpu_type=gpu, num_gpus=count, hours=h, market=market)
                  for h in (split, hours - split)]
        assert math.fsum(pieces) == pytest.approx(cost)


def test_placement_cost_reads_device_names_instances_and_the_default_market():
    prices = PricesConfig()
    h100 = prices.gpus["H100"]
    assert placement_cost_usd(prices, gpu_type="NVIDIA H100 80GB HBM3", num_gpus=8, hours=2) == pytest.approx(
        16 * h100.on_demand_usd_per_hour)
    prices.market = Market.spot
    assert placement_cost_usd(prices, gpu_type="H100", num_gpus=8, hours=2) == pytest.approx(
        16 * h100.spot_usd_per_hour)
    # On a known instance its own price per GPU counts: a g5.48xlarge's A10G costs more than a g5.xlarge's.
    g5 = prices.instances["g5.48xlarge"]
    assert placement_cost_usd(prices, gpu_type="A10G", num_gpus=8, hours=1, market="on_demand",
                              instance_type="g5.48xlarge") == pytest.approx(g5.on_demand_usd_per_hour)
    assert placement_cost_usd(prices, gpu_type="A10G", num_gpus=8, hours=1, market="on_demand",
                              instance_type="unknown.xlarge") == pytest.approx(
        8 * prices.gpus["A10G"].on_demand_usd_per_hour)
    assert placement_cost_usd(prices, gpu_type=None, num_gpus=0, hours=3) == 0.0  # a CPU run


def test_an_added_instance_type_is_priced_per_gpu():
    prices = PricesConfig()
    prices.instances["g7.xlarge"] = InstancePriceConfig(gpu_type="L4", num_gpus=2, on_demand_usd_per_hour=3.0,
                                                        spot_usd_per_hour=1.0)
    assert gpu_hour_usd(prices, "L4", "spot", instance_type="g7.xlarge") == 0.5


@pytest.mark.parametrize("change, key", [
    (lambda p: setattr(p.gpus["H100"], "spot_usd_per_hour", -1.0), "plan.prices.gpus.H100.spot_usd_per_hour=-1.0"),
    (lambda p: setattr(p.instances["p5.48xlarge"], "on_demand_usd_per_hour", math.nan),
     "plan.prices.instances.p5.48xlarge.on_demand_usd_per_hour=nan"),
    (lambda p: setattr(p.instances["g6.xlarge"], "num_gpus", 0), "plan.prices.instances.g6.xlarge.num_gpus=0"),
    (lambda p: setattr(p, "as_of_date", "last July"), "plan.prices.as_of_date='last July'"),
])
def test_a_bad_price_names_the_key(change, key):
    prices = PricesConfig()
    change(prices)
    with pytest.raises(ConfigError) as caught:
        check_prices(prices)
    assert str(caught.value).startswith(key)


def test_an_unknown_market_or_gpu_or_a_negative_duration_names_what_is_wrong():
    prices = PricesConfig()
    with pytest.raises(ConfigError, match="plan.prices.market='reserved': choose one of on_demand, spot"):
        placement_cost_usd(prices, gpu_type="H100", num_gpus=1, hours=1, market="reserved")
    with pytest.raises(ConfigError, match=r"no price for GPU 'T4' in plan.prices.gpus .*\+plan.prices.gpus="):
        placement_cost_usd(prices, gpu_type="T4", num_gpus=1, hours=1)
    with pytest.raises(ConfigError, match="hours=-1"):
        placement_cost_usd(prices, gpu_type="H100", num_gpus=1, hours=-1)
