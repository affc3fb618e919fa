"""The per-user model cache on the machine that loads a model: a local copy of a storage folder, keyed by its
content, downloaded at most once per content and renamed into place whole (`<tmp>/llmp-models-<uid>/<key>/`)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

import fsspec

from llm_platform.errors import StageError
from llm_platform.storage.records import fingerprint
from llm_platform.storage.transfer import download_objects, object_names
from llm_platform.storage.uri import filesystem


def private_cache_dir(name: str) -> str:
    """`<tmp>/<name>-<uid>`, created mode 0700 and refused when another user owns it or others may write to it: a
    predictable folder in a shared /tmp must not let another local user plant files that we would then load."""
    folder = os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise StageError(f"cache folder {folder} is not a folder owned by this user and closed to others; remove it "
                         f"or pass another cache folder")
    return folder


def download_cached(uri: str, cache_dir: str, attempts: int = 3) -> str:
    """A local copy of the URI folder under `cache_dir`, keyed by its content, downloaded at most once per content.

    The key hashes the URI and every object's key, size and ETag, so a model re-uploaded to the same URI is
    fetched again. A copy is downloaded into a private temporary folder beside the cache entry and renamed into
    place only when complete (rename is atomic), so concurrent callers (two replicas on one node) never read files
    that another is still writing: the loser of the race drops its copy and uses the winner's. The folder is
    listed again after the download; if an object changed meanwhile, the copy is discarded and fetched anew.
    """
    fs, path = filesystem(uri)
    for _ in range(attempts):
        key = _content_key(fs, uri, path)
        final = os.path.join(cache_dir, key)
        if os.path.isdir(final):
            return final
        os.makedirs(cache_dir, exist_ok=True)
        _remove_abandoned_partials(cache_dir)
        partial = tempfile.mkdtemp(prefix=f".{key}.partial-{os.getpid()}-", dir=cache_dir)
        try:
            download_objects(fs, uri, object_names(uri, path, fs.find(path)), partial)
            if _content_key(fs, uri, path) != key:
                continue  # re-uploaded while we copied: discard (finally) and start over
            try:
                os.rename(partial, final)
            except OSError:
                if not os.path.isdir(final):
                    raise
            return final  # ours, or an identical copy another process renamed into place first
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    raise StageError(f"{uri} kept changing while it was downloaded ({attempts} attempts); retry once it is stable")


def _remove_abandoned_partials(cache_dir: str) -> None:
    """Delete the temporary download folders of processes that are gone (killed mid-download: `finally` never ran,
    and each such folder can hold most of a model). A folder names its process (`.<key>.partial-<pid>-<random>`);
    the cache is per node, so a pid that is not running here is gone. Folders of the old unnamed form are left."""
    for entry in os.scandir(cache_dir):
        _, sep, rest = entry.name.partition(".partial-")
        pid = rest.split("-", 1)[0]
        if not (sep and entry.name.startswith(".") and pid.isdigit() and entry.is_dir(follow_symlinks=False)):
            continue
        if not _process_exists(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _content_key(fs: fsspec.AbstractFileSystem, uri: str, path: str) -> str:
    objects = fs.find(path, detail=True)
    if not objects:
        raise StageError(f"{uri}: no such folder, or it is empty")
    listing = sorted((key, int(info.get("size") or 0), str(info.get("ETag") or info.get("etag") or "").strip('"'))
                     for key, info in objects.items())
    return fingerprint({"uri": uri, "objects": listing}, length=32)
