"""Schema of the `serve` group."""

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """A Ray Serve deployment of one model version behind an OpenAI-compatible API."""

    model: str = "registry:debug"
    """What to serve: `registry:<name>[/<version>]`, a local path or an s3:// URI of an HF-format model."""
    host: str = "127.0.0.1"
    """HTTP bind address."""
    port: int = 8000
    """HTTP port."""
