"""Schema of `plan.prices`: on-demand and spot $/hour per instance type and per GPU, dated.

The defaults are AWS us-east-1 Linux list prices as we knew them on `PRICES_AS_OF` (the public EC2 on-demand
pricing page, after AWS's June 2025 cut of P4/P5 prices). They are list prices and they drift: AWS changes them
without notice, other regions cost 0-30% more, and spot prices move every few minutes (the spot figures are a
typical us-east-1 price from the spot price history, rounded, not a quote). `p5e.48xlarge` is sold mostly through
Capacity Blocks; its figure is the p5en on-demand list price. Override any of them at the command line:

    plan.prices.gpus.H100.spot_usd_per_hour=2.1                                      # one GPU's price
    plan.prices.instances='{p5.48xlarge: {on_demand_usd_per_hour: 40}}'              # one instance's price
    +plan.prices.instances='{g7.xlarge: {gpu_type: L4, num_gpus: 1, on_demand_usd_per_hour: 0.9,
                                         spot_usd_per_hour: 0.4}}'                   # a new instance type

(Instance names hold dots, which Hydra's dotted keys cannot address, hence the `{name: {...}}` form.) Checks
beyond types (no negative price, an instance's GPU priced) are in `llm_platform/costs.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from llm_platform.config.choices import Choice

PRICES_AS_OF = "2025-07-01"
"""The date the default price table was last checked against the AWS price list."""


class Market(Choice):
    """How GPUs are bought: on-demand (list price) or spot (cheaper, can be reclaimed)."""

    on_demand = "on_demand"
    spot = "spot"


@dataclass
class InstancePriceConfig:
    """One instance type: the GPUs it carries and its $/hour."""

    gpu_type: str = MISSING
    """Its GPU (a key of `plan.prices.gpus`)."""
    num_gpus: int = MISSING
    """GPUs per instance."""
    on_demand_usd_per_hour: float = MISSING
    """On-demand price of the whole instance, $/hour."""
    spot_usd_per_hour: float = MISSING
    """Spot price of the whole instance, $/hour."""


@dataclass
class GpuPriceConfig:
    """One GPU's $/hour when bought by the GPU (the cheapest instance per GPU that carries it)."""

    on_demand_usd_per_hour: float = MISSING
    """On-demand price of one GPU, $/hour."""
    spot_usd_per_hour: float = MISSING
    """Spot price of one GPU, $/hour."""


@dataclass
class CpuPriceConfig:
    """One vCPU's $/hour on a CPU-only instance: what CPU workers and replicas cost (GPU instances' CPUs are in the
    instance's price)."""

    on_demand_usd_per_hour: float = 0.0446
    """On-demand price of one vCPU, $/hour (c7i.xlarge: $0.1785 for 4 vCPUs)."""
    spot_usd_per_hour: float = 0.018
    """Spot price of one vCPU, $/hour (c7i.xlarge typical spot, rounded)."""


# (GPU, GPUs per instance, on-demand $/h, spot $/h) per instance, AWS us-east-1 Linux, as of PRICES_AS_OF.
_AWS_US_EAST_1: dict[str, tuple[str, int, float, float]] = {
    "g5.xlarge": ("A10G", 1, 1.006, 0.45),
    "g5.48xlarge": ("A10G", 8, 16.288, 6.0),
    "g6.xlarge": ("L4", 1, 0.8048, 0.35),
    "g6.48xlarge": ("L4", 8, 13.3504, 5.0),
    "g6e.xlarge": ("L40S", 1, 1.861, 0.80),
    "g6e.48xlarge": ("L40S", 8, 30.131, 12.0),
    "p4d.24xlarge": ("A100-40G", 8, 21.96, 9.80),
    "p4de.24xlarge": ("A100-80G", 8, 27.45, 12.30),
    "p5.48xlarge": ("H100", 8, 55.04, 24.80),
    "p5e.48xlarge": ("H200", 8, 63.30, 28.50),
}


def default_instances() -> dict[str, InstancePriceConfig]:
    """The instance table."""
    return {name: InstancePriceConfig(gpu_type=gpu, num_gpus=n, on_demand_usd_per_hour=od, spot_usd_per_hour=spot)
            for name, (gpu, n, od, spot) in _AWS_US_EAST_1.items()}


def default_gpus() -> dict[str, GpuPriceConfig]:
    """Per GPU: the cheapest per-GPU price of the instances that carry it (g5.xlarge for an A10G, a p5.48xlarge's
    eighth for an H100), so the GPU table is derived from the instance table, not a second set of numbers."""
    gpus: dict[str, GpuPriceConfig] = {}
    for gpu, n, od, spot in _AWS_US_EAST_1.values():
        now = gpus.get(gpu)
        gpus[gpu] = GpuPriceConfig(
            on_demand_usd_per_hour=min(od / n, now.on_demand_usd_per_hour if now else float("inf")),
            spot_usd_per_hour=min(spot / n, now.spot_usd_per_hour if now else float("inf")))
    return gpus


@dataclass
class PricesConfig:
    """Cloud prices for the cost estimates of `llm-platform plan` and a run's accumulated cost
    (`llm_platform/costs.py`)."""

    as_of_date: str = PRICES_AS_OF
    """Date (YYYY-MM-DD) the prices were taken; printed beside every cost."""
    source: str = "AWS us-east-1 list prices (Linux; spot: typical, rounded)"
    """Where the prices come from; printed beside every cost."""
    market: Market = Market.on_demand
    """The market a run is billed at by default: on_demand or spot."""
    gpus: dict[str, GpuPriceConfig] = field(default_factory=default_gpus)
    """GPU name (a key of the peaks table in llm_platform/models/flops.py, or any other) -> its $/hour."""
    instances: dict[str, InstancePriceConfig] = field(default_factory=default_instances)
    """Instance type (`p5.48xlarge`) -> its GPUs and $/hour."""
    cpu: CpuPriceConfig = field(default_factory=CpuPriceConfig)
    """Per vCPU of a CPU-only placement: `plan.prices.cpu.on_demand_usd_per_hour`, `.spot_usd_per_hour`."""
