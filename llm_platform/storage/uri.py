"""Storage URIs and their filesystems: the S3 settings in force, the fsspec and pyarrow clients built from them,
and the plain operations on a URI (join, list, stat, read, delete).

Credentials come only from the standard AWS chain (env, profile, IRSA web identity, instance role); this module
never reads or logs them. The endpoint comes from `StorageConfig.endpoint_url` or `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec

from llm_platform.config.storage import StorageConfig

_settings: dict[str, Any] = {"endpoint_url": None, "region": None, "retries": 8}


def configure(cfg: StorageConfig | dict | None) -> None:
    """Set the S3 endpoint/region/retries for this process, and export them so Ray workers inherit them."""
    if cfg is None:
        return
    data = cfg if isinstance(cfg, dict) else {"endpoint_url": cfg.endpoint_url, "region": cfg.region,
                                              "retries": cfg.retries}
    _apply(data)
    _filesystems.clear()  # a reconfigured process may hold other credentials too: build its clients again


def _apply(data: dict[str, Any]) -> None:
    _settings.update({k: data.get(k, _settings[k]) for k in _settings})
    if _settings["endpoint_url"]:
        os.environ["AWS_ENDPOINT_URL"] = _settings["endpoint_url"]
    if _settings["region"]:
        os.environ.setdefault("AWS_DEFAULT_REGION", _settings["region"])


@contextmanager
def using(driver_settings: dict[str, Any] | None) -> Iterator[None]:
    """Use these storage settings (from `settings()` on the driver) for a block, then restore the previous ones.

    For Ray tasks: a pooled worker process runs tasks of many stages and runs, and the endpoint its job started
    with may not be the one this run's driver uses, so a task takes the driver's settings as an argument and must
    not leave them behind for the next task. The clients stay cached, keyed by the settings they were built for
    (`filesystem`): building an S3 client costs a task about as much as reading a small file.
    """
    saved = dict(_settings), {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    if driver_settings is not None:
        _apply(driver_settings)
    try:
        yield
    finally:
        _settings.update(saved[0])
        for key, value in saved[1].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def settings() -> dict[str, Any]:
    """The storage settings in force (endpoint, region, retries) as a plain dict for Ray workers."""
    return {
        "endpoint_url": endpoint_url(),
        "region": _settings["region"] or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        "retries": _settings["retries"],
    }


def endpoint_url() -> str | None:
    """The S3 endpoint in force, if any."""
    return _settings["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")


def is_remote(uri: str) -> bool:
    """True for object-store URIs (s3://)."""
    return uri.startswith(("s3://", "s3a://"))


def _strip_file(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


_filesystems: dict[tuple, Any] = {}  # clients by (kind, the settings they were built with)


def s3_options() -> dict[str, Any]:
    """Keyword arguments for `s3fs.S3FileSystem` with the configured endpoint, region and retries."""
    client_kwargs: dict[str, Any] = {}
    if endpoint_url():
        client_kwargs["endpoint_url"] = endpoint_url()
    region = settings()["region"]
    if region:
        client_kwargs["region_name"] = region
    return {
        "client_kwargs": client_kwargs,
        "config_kwargs": {"retries": {"max_attempts": int(_settings["retries"]), "mode": "adaptive"}},
        # Listings are cached by default; our writers and readers interleave, so do not trust a stale listing.
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for a URI and the path inside it."""
    if is_remote(uri):
        key = ("s3", *settings().values())
        if key not in _filesystems:
            import s3fs

            _filesystems[key] = s3fs.S3FileSystem(**s3_options())
        return _filesystems[key], uri.split("://", 1)[1]
    if ("file",) not in _filesystems:
        _filesystems[("file",)] = fsspec.filesystem("file")
    return _filesystems[("file",)], os.path.abspath(os.path.expanduser(_strip_file(uri)))


def pyarrow_filesystem(uri: str):
    """A `pyarrow.fs` filesystem for Ray Data reads/writes, and the path inside it."""
    import pyarrow.fs as pafs

    if is_remote(uri):
        opts: dict[str, Any] = {}
        endpoint = endpoint_url()
        if endpoint:
            opts["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                opts["scheme"] = "http"
        region = settings()["region"]
        if region:
            opts["region"] = region
        key = ("pyarrow-s3", *sorted(opts.items()), int(_settings["retries"]))
        if key not in _filesystems:
            _filesystems[key] = _pyarrow_s3(opts, int(_settings["retries"]))
        return _filesystems[key], uri.split("://", 1)[1]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(_strip_file(uri)))


_RetryingS3FileSystem: Any = None


def _pyarrow_s3(options: dict[str, Any], max_attempts: int):
    """A `pyarrow.fs.S3FileSystem` that keeps its retry strategy when pickled.

    pyarrow's own `S3FileSystem.__reduce__` keeps the connection options but drops `retry_strategy`, so the copy
    that Ray Data and Ray Train ship to their workers (which do the reads, the parquet writes and the checkpoint
    uploads) would run with pyarrow's default strategy (3 attempts) instead of `retries` attempts. The subclass
    rebuilds itself through this function on the other side. It is defined on first use so that importing this module
    does not import pyarrow.
    """
    import pyarrow.fs as pafs

    global _RetryingS3FileSystem
    if _RetryingS3FileSystem is None:
        class RetryingS3FileSystem(pafs.S3FileSystem):
            def __reduce__(self):
                return _pyarrow_s3, (self.llmp_options, self.llmp_max_attempts)

        _RetryingS3FileSystem = RetryingS3FileSystem
    fs = _RetryingS3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
    fs.llmp_options, fs.llmp_max_attempts = dict(options), max_attempts
    return fs


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (posix separators for S3)."""
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(_strip_file(uri), *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under a folder URI; empty when it does not exist."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def glob(pattern: str) -> list[str]:
    """URIs matching a glob (sorted), with the scheme kept."""
    fs, path = filesystem(pattern)
    matches = sorted(fs.glob(path))
    if is_remote(pattern):
        scheme = pattern.split("://", 1)[0]
        return [f"{scheme}://{m}" for m in matches]
    return matches


def info(uri: str) -> dict[str, Any]:
    """Size and a change marker (ETag for S3, mtime for local) for a file URI."""
    fs, path = filesystem(uri)
    return _file_info(uri, fs.info(path))


def files_info(uri: str, recursive: bool = False) -> list[dict[str, Any]]:
    """Every file matching a glob, or (`recursive`) under a folder, with `info`'s size and change marker, taken
    from the listing itself: on S3 one LIST request per 1,000 objects instead of a HEAD per file (a corpus of
    thousands of small files spent longer listing than reading). Sorted by URI; folders left out."""
    fs, path = filesystem(uri)
    found = fs.find(path, detail=True) if recursive else fs.glob(path, detail=True)
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    return [_file_info(prefix + p, d) for p, d in sorted(found.items()) if d.get("type") != "directory"]


def _file_info(uri: str, details: dict[str, Any]) -> dict[str, Any]:
    marker = details.get("ETag") or details.get("etag") or details.get("mtime") or details.get("LastModified")
    return {"uri": uri, "size": int(details.get("size") or 0), "marker": str(marker).strip('"')}


@contextmanager
def open_read(uri: str, mode: str = "rb", compression: str | None = None) -> Iterator[IO]:
    """Open a URI for reading (compression: None, 'infer', 'gzip', 'zstd')."""
    fs, path = filesystem(uri)
    with fs.open(path, mode, compression=compression) as f:
        yield f


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_whole(uri: str) -> bytes:
    """A whole object's bytes in one request. `read_bytes` on S3 asks for the object's size first (s3fs sends a HEAD
    to decide whether to fetch a large object in concurrent parts), which is one round trip more per small file:
    a corpus of many small files spends its time on exactly that."""
    if not is_remote(uri):
        return read_bytes(uri)
    fs, path = filesystem(uri)
    return fs.cat_file(path, start=0)  # a range from 0: one GET, no size check


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        fs, path = filesystem(uri)
        fs.makedirs(path, exist_ok=True)


def delete(uri: str, recursive: bool = True) -> None:
    """Remove a file or folder if present."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
