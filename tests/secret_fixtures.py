"""Sentinel secrets and a scan of Ray's session folder for them (issue 16: no secret may reach Ray's logs)."""

from __future__ import annotations

import os
import uuid

# Variables that hold secrets in practice; each is set to a unique sentinel in the driver's environment.
SECRET_NAMES = ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "OPENAI_API_KEY",
                "LLM_PLATFORM_API_KEYS", "HF_TOKEN")


def sentinel_secrets() -> dict[str, str]:
    """{name: `sentinel-<uuid>`} for every name in SECRET_NAMES."""
    return {name: f"sentinel-{uuid.uuid4().hex}" for name in SECRET_NAMES}


def ray_session_dir() -> str:
    """The session folder of the Ray this process is connected to (logs, runtime env resources, sockets)."""
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


def files_containing(folder: str, needles: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """{path: [needles found in it]} over every regular file under `folder` (sockets and links skipped)."""
    wanted = [n.encode() for n in needles]
    hits: dict[str, list[str]] = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:  # a file Ray removed while we walked
                continue
            found = [n.decode() for n in wanted if n in data]
            if found:
                hits[path] = found
    return hits


def git_ignored(repo_root, scratch, paths: list[str]) -> set[str]:
    """The paths among `paths` that `repo_root`'s .gitignore ignores, asked of git itself in a new repository at
    `scratch` (a folder that does not exist yet); skips the test without git."""
    import shutil
    import subprocess

    import pytest

    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    subprocess.run([git, "init", "-q", str(scratch)], check=True)
    shutil.copy(os.path.join(repo_root, ".gitignore"), os.path.join(scratch, ".gitignore"))
    proc = subprocess.run([git, "-C", str(scratch), "check-ignore", "--no-index", "--stdin"],
                          input="\n".join(paths), capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    return set(proc.stdout.split())
