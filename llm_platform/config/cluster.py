"""Schema of the `cluster` group: which Ray to use."""

from dataclasses import dataclass


@dataclass
class ClusterConfig:
    """How a stage reaches Ray. An address (or `RAY_ADDRESS`) joins a cluster; otherwise a local Ray is started."""

    address: str | None = None
    """Ray address (`auto`, `ray://host:10001`, `host:6379`). Falls back to `RAY_ADDRESS`; unset starts a local Ray."""
    num_cpus: int | None = 8
    """Logical CPUs of a local Ray. More than the cores, so Ray Data keeps headroom next to training workers."""
    num_gpus: int | None = None
    """GPUs of a local Ray (None detects them)."""
    temp_dir: str | None = None
    """Temp dir of a local Ray. Falls back to `RAY_TMPDIR`, then Ray's default."""
    object_store_memory_bytes: int | None = None
    """Object store size of a local Ray (None lets Ray choose)."""
    log_to_driver: bool = True
    """Forward worker logs to the console."""
