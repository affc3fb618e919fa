"""Schema of the `storage` group: where every artifact lives."""

from dataclasses import dataclass


@dataclass
class StorageConfig:
    """Artifact storage. Credentials are never configured here: they come from the standard AWS chain."""

    root: str = "${oc.env:LLM_PLATFORM_HOME,.llm-platform}/storage"
    """Root URI for all artifacts: a local folder, `file://...` or `s3://bucket/prefix`."""
    endpoint_url: str | None = None
    """S3 endpoint (MinIO, moto, a VPC endpoint). Falls back to the standard `AWS_ENDPOINT_URL`."""
    region: str | None = None
    """S3 region. Falls back to `AWS_REGION` / `AWS_DEFAULT_REGION`."""
    retries: int = 8
    """Attempts per S3 call (botocore adaptive retry mode), so 500/503/SlowDown and resets are retried."""
