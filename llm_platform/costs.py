"""Dollars from GPU-hours: the checks on `plan.prices` and the price lookups of `llm-platform plan`, and the cost of
a placement a run really got (GPU type, count, hours), for a training run to accumulate.

Plain functions over the typed `PricesConfig` (llm_platform/config/prices.py); no Ray, no Hydra.
"""

from __future__ import annotations

import datetime
import math

from llm_platform.config.prices import CpuPriceConfig, GpuPriceConfig, InstancePriceConfig, Market, PricesConfig
from llm_platform.errors import ConfigError
from llm_platform.models.flops import normalize_gpu

MARKETS = tuple(m.value for m in Market)


def check_prices(prices: PricesConfig, key: str = "plan.prices") -> None:
    """Refuse what the types let through: a negative or non-finite price, an instance without GPUs, a bad date.

    Raises:
        ConfigError: naming the key, e.g. `plan.prices.gpus.H100.spot_usd_per_hour=-1.0`.
    """
    try:
        datetime.date.fromisoformat(prices.as_of_date)
    except ValueError:
        raise ConfigError(f"{key}.as_of_date={prices.as_of_date!r}: give the date as YYYY-MM-DD") from None
    entries: list[tuple[str, GpuPriceConfig | InstancePriceConfig | CpuPriceConfig]]
    entries = [(f"{key}.gpus.{name}", entry) for name, entry in prices.gpus.items()]
    entries += [(f"{key}.instances.{name}", entry) for name, entry in prices.instances.items()]
    entries.append((f"{key}.cpu", prices.cpu))
    for where, entry in entries:
        for market in MARKETS:
            value = getattr(entry, f"{market}_usd_per_hour")
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{where}.{market}_usd_per_hour={value}: a price must be a number >= 0")
    for name, instance in prices.instances.items():
        if instance.num_gpus < 1:
            raise ConfigError(f"{key}.instances.{name}.num_gpus={instance.num_gpus}: must be at least 1")


def as_market(market: Market | str, key: str = "plan.prices.market") -> Market:
    """`market` as a Market, or a ConfigError naming `key` and the markets there are."""
    try:
        return Market(market)
    except ValueError:
        raise ConfigError(f"{key}={market!r}: choose one of {', '.join(MARKETS)}") from None


def gpu_hour_usd(prices: PricesConfig, gpu_type: str, market: Market | str, instance_type: str | None = None) -> float:
    """$ per GPU-hour of `gpu_type` on `market`: the instance's price over its GPUs when `instance_type` is in the
    table (and carries that GPU), else the GPU's own price.

    Raises:
        ConfigError: for a GPU the table has no price for, naming the key to add.
    """
    market = as_market(market)
    field = f"{market.value}_usd_per_hour"
    instance = prices.instances.get(instance_type) if instance_type else None
    if instance is not None and _gpu_key(prices, instance.gpu_type) == _gpu_key(prices, gpu_type):
        return float(getattr(instance, field)) / instance.num_gpus
    key = _gpu_key(prices, gpu_type)
    if key is None:
        raise ConfigError(f"no price for GPU {gpu_type!r} in plan.prices.gpus ({', '.join(prices.gpus)}): add one "
                          f"with +plan.prices.gpus='{{{gpu_type}: {{on_demand_usd_per_hour: ..., "
                          f"spot_usd_per_hour: ...}}}}'")
    return float(getattr(prices.gpus[key], field))


def cpu_hour_usd(prices: PricesConfig, market: Market | str | None = None) -> float:
    """$ per vCPU-hour of a CPU-only placement on `market` (None: `prices.market`)."""
    market = as_market(prices.market if market is None else market)
    return float(getattr(prices.cpu, f"{market.value}_usd_per_hour"))


def placement_usd_per_hour(prices: PricesConfig, *, gpu_type: str | None, num_gpus: int, num_cpus: float = 0.0,
                           market: Market | str | None = None, instance_type: str | None = None) -> float:
    """$/hour of a placement: its GPUs at the GPU (or instance) price, or, for a CPU-only placement, its vCPUs at
    the CPU price (a GPU instance's CPUs are in its price).

    Raises:
        ConfigError: a negative count, an unknown market, or a GPU the table has no price for.
    """
    if num_gpus < 0 or not (math.isfinite(num_cpus) and num_cpus >= 0):
        raise ConfigError(f"num_gpus={num_gpus}, num_cpus={num_cpus}: both must be >= 0")
    market = prices.market if market is None else market
    if gpu_type is not None and num_gpus > 0:
        return num_gpus * gpu_hour_usd(prices, gpu_type, market, instance_type)
    return num_cpus * cpu_hour_usd(prices, market)


def placement_cost_usd(prices: PricesConfig, *, gpu_type: str | None, num_gpus: int, hours: float,
                       num_cpus: float = 0.0, market: Market | str | None = None,
                       instance_type: str | None = None) -> float:
    """What a placement held for `hours` costs at the table's prices: the accumulated cost of a run from the
    placement it really got (`ray.train.get_context()`'s world size, the device name, wall-clock hours).

    Args:
        prices: the price table (`plan.prices`).
        gpu_type: a device name as torch or Ray reports it (`NVIDIA H100 80GB HBM3`, `A100-SXM4-40GB`, `L4`) or a
            table key; None for a CPU-only placement.
        num_gpus: GPUs held (all workers together).
        hours: wall-clock hours they were held.
        num_cpus: vCPUs held by a CPU-only placement (priced at `prices.cpu`); ignored when GPUs are held.
        market: on_demand or spot; None uses `prices.market`.
        instance_type: the instance the GPUs sit on, when known (`p5.48xlarge`): its price per GPU is used.

    Returns:
        Dollars.

    Raises:
        ConfigError: a negative count or duration, an unknown market, or a GPU the table has no price for.
    """
    if not (math.isfinite(hours) and hours >= 0):
        raise ConfigError(f"hours={hours}: must be >= 0")
    return hours * placement_usd_per_hour(prices, gpu_type=gpu_type, num_gpus=num_gpus, num_cpus=num_cpus,
                                          market=market, instance_type=instance_type)


def _gpu_key(prices: PricesConfig, name: str) -> str | None:
    """The `prices.gpus` key for a device name: itself, else its peaks-table name (`NVIDIA H100 80GB HBM3`)."""
    if name in prices.gpus:
        return name
    key = normalize_gpu(name)
    return key if key in prices.gpus else None
