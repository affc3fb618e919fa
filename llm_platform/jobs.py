"""Ray Jobs: run a stage as a job on a Ray cluster, follow its logs, mirror its exit status; list, logs, stop.

A job is `llm-platform <stage> <overrides>` run by the cluster's job supervisor, with a runtime environment that
carries the code and the storage settings:

- code: the working dir of this checkout (uploaded by Ray, `.gitignore`d and `EXCLUDES` paths left out), so the
  cluster runs exactly the local code and `conf/`; or, with `working_dir=None`, the package installed in the
  cluster's image (`Dockerfile`). The upload is stored in the cluster's GCS and unpacked for every job, so
  `plan_upload` leaves key files out by name (`KEY_FILES`) and refuses a key-like file that holds a secret.
- environment: where storage is (`STORAGE_ENV`: endpoint, region, bucket), never credentials. Runtime envs are
  stored and shown by the dashboard, so a key there would leak; workers take credentials from their own
  environment (IRSA or an instance role on a cluster, the head's inherited environment on a local one).

The driver of the job finds the cluster through `RAY_ADDRESS`, which the job supervisor sets, so stages need no
address of their own. This module is one of the Ray seams (docs/ARCHITECTURE.md); `commands/submit.py` and
`commands/jobs.py` are its command lines, and the submit command composes the stage's config before submitting
(only the command layer imports Hydra).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from llm_platform.cluster import is_secret
from llm_platform.errors import ConfigError, StageError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# Stages that run as jobs (Hydra entry points); the other commands are local tools.
JOB_STAGES = ("data", "train", "tune", "eval", "serve", "run")
# Where storage is, forwarded to the job when set here. Credentials are deliberately absent.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "LLM_PLATFORM_BUCKET",
               "HF_HUB_OFFLINE")
# Never uploaded with the working dir (on top of .gitignore): environments, local artifacts, Terraform state.
EXCLUDES = [".git", ".venv", ".venv-*", "*.egg-info", "__pycache__", ".pytest_cache", ".llm-platform", "outputs",
            "multirun", "terraform/.terraform", "*.tfstate", "*.tfstate.*"]
# Files that are keys by their name: never uploaded, even where no .gitignore covers them (a --working-dir elsewhere,
# RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1). .gitignore and .dockerignore list the same patterns (a test checks).
KEY_FILES = ["*api-keys*.txt", "*api_keys*.txt", "*.pem", "*.key", "*.p12", "*.pfx", ".env", ".env.*",
             "!.env.example", "credentials", ".netrc", "id_rsa", "id_ecdsa", "id_ed25519"]
# Other uploaded files whose path sounds like a secret are read (when small) and refused if they hold one.
_KEYLIKE_PATH = re.compile(r"key|secret|token|credential|passw|\.env$", re.IGNORECASE)
_SCAN_MAX_BYTES = 64 * 1024
_SECRET_TEXT = (
    ("a private key", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")),
    ("an AWS secret access key", re.compile(r"aws_secret_access_key\s*[=:]\s*[\"']?[A-Za-z0-9/+]{40}", re.I)),
    ("an AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")),
)
# A file of API keys or tokens, one a line (what `serve.auth.api_key_file` reads): every line one random-looking
# word, with letters and digits, of 20 characters or more.
_KEY_LINE = re.compile(r"(?=\D*\d)(?=[^A-Za-z]*[A-Za-z])[A-Za-z0-9_\-+/=.~]{20,}")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# How long `submit` retries while a freshly started head has no job agent yet ("No available agent"). The raylet
# itself waits up to RAY_agent_register_timeout_ms for the agent; on a loaded machine 120 s was not always enough.
AGENT_WAIT_S = 300.0


@dataclass
class JobResult:
    """How a job ended."""

    submission_id: str
    status: str
    """SUCCEEDED, FAILED or STOPPED."""
    exit_code: int
    """What `llm-platform submit` exits with: the driver's exit code, 1 if unknown, 130 when stopped."""
    message: str | None = None


def default_address() -> str:
    """The Jobs API address: `RAY_API_SERVER_ADDRESS`, an http(s) `RAY_ADDRESS`, else the local dashboard."""
    for key in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(key, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def project_root() -> Path | None:
    """The checkout this package runs from (pyproject.toml and conf/ beside it), or None for an installed copy."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "conf").is_dir() and (root / "llm_platform").is_dir():
        return root
    return None


def entrypoint(stage: str, overrides: list[str]) -> str:
    """The shell command the job runs; overrides are quoted so values with spaces survive the shell."""
    if stage not in JOB_STAGES:
        raise ConfigError(f"stage {stage!r} cannot run as a job; choose one of: {', '.join(JOB_STAGES)}")
    return shlex.join(["llm-platform", stage, *overrides])


def parse_env(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings as a dict; refuses malformed pairs and anything that looks like a secret."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE")
        if is_secret(key, value):
            raise ConfigError(f"--env {key}: credentials are never sent with a job (runtime envs are visible in "
                              "the dashboard and written to Ray's logs); give the cluster an IAM role (IRSA, "
                              "instance profile) or put the secret in the pods' environment from a Kubernetes "
                              "Secret (docs/cloud.md)")
        env[key] = value
    return env


@dataclass
class Upload:
    """What a job's working dir uploads: the folder and Ray's `excludes` for it."""

    working_dir: Path
    excludes: list[str]
    """`EXCLUDES` and `KEY_FILES`, in runtime_env's `excludes` syntax (gitwildmatch, relative to the folder)."""
    left_out: list[str]
    """Key files (paths relative to the folder) that only `KEY_FILES` keeps out: .gitignore/.rayignore did not."""


def _uploaded_files(root: Path, excludes: list[str]) -> Iterator[Path]:
    """The files Ray uploads from `root` with these `excludes`.

    Mirrors Ray 2.60's packaging (`_dir_travel`): Ray's default excludes join ours, each folder's `.gitignore`
    (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE is 1) and `.rayignore` apply to the paths below it, and a path any
    pattern matches is skipped with all it holds.
    """
    # Ray's own copy of pathspec: the matching its packaging does (the PyPI package is not a dependency of ours).
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.thirdparty.pathspec import PathSpec

    names = [".rayignore"] if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") == "1" else \
        [".gitignore", ".rayignore"]

    def walk(path: Path, specs: list[tuple[Path, PathSpec]]) -> Iterator[Path]:
        specs = specs + [(path, PathSpec.from_lines("gitwildmatch", (path / n).read_text().splitlines()))
                         for n in names if (path / n).is_file()]
        if any(spec.match_file(str(path.relative_to(base))) for base, spec in specs):
            return
        if path.is_dir():
            for sub in sorted(path.iterdir()):
                yield from walk(sub, specs)
        elif path.is_file():
            yield path

    yield from walk(root, [(root, PathSpec.from_lines("gitwildmatch", get_runtime_env_default_excludes() + excludes))])


def _secret_in(path: Path) -> str | None:
    """What secret a small text file holds ("a private key", ...), or None. Never returns the secret itself."""
    try:
        if path.stat().st_size > _SCAN_MAX_BYTES:
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # unreadable or binary: not a text secret
        return None
    for what, pattern in _SECRET_TEXT:
        if pattern.search(text):
            return what
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and all(_KEY_LINE.fullmatch(line) for line in lines):
        return "API keys or tokens (one a line)"
    return None


def plan_upload(working_dir: str | Path) -> Upload:
    """The upload of `working_dir` as a job's code: key files left out, and no secret in what goes up.

    Raises:
        ConfigError: the folder has no conf/, or a file that would be uploaded holds a secret (named, with where
            to move it; the secret itself is never shown).
    """
    from ray._private.thirdparty.pathspec import PathSpec

    path = Path(working_dir).resolve()
    if not (path / "conf").is_dir():
        raise ConfigError(f"--working-dir {path}: no conf/ folder there (expected the project's checkout)")
    key_files = PathSpec.from_lines("gitwildmatch", KEY_FILES)
    left_out, found = [], []
    for file in _uploaded_files(path, EXCLUDES):
        rel = file.relative_to(path).as_posix()
        if key_files.match_file(rel):
            left_out.append(rel)
        elif _KEYLIKE_PATH.search(rel) and (what := _secret_in(file)):
            found.append(f"{rel} looks like {what}")
    if found:
        raise ConfigError(f"refusing to upload {path} as the job's working dir: {'; '.join(found)}. The upload "
                          "is stored on the cluster and readable by every job: move such files outside the "
                          "checkout (serving keys: $HOME/.config/llm-platform/api-keys.txt, docs/cloud.md), or list "
                          "them in .rayignore; rename a file that holds no secret")
    return Upload(path, EXCLUDES + KEY_FILES, left_out)


def runtime_env(working_dir: str | Path | Upload | None, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime env: the code (a working dir to upload, or none for the installed package) and storage env.

    A path is planned here (`plan_upload`: its key files left out, a secret in it refused); pass the `Upload` when
    the caller planned it already.
    """
    env = {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}
    env.update(extra_env or {})
    secrets = sorted(k for k, v in env.items() if is_secret(k, v))
    if secrets:  # only reachable through extra_env from a caller that skipped parse_env
        raise ConfigError(f"refusing to send credentials with a job: {', '.join(secrets)}")
    # Stages call `ray.init(runtime_env={"env_vars": cluster.worker_env()})`, which repeats some of these keys; Ray
    # refuses a driver runtime env that repeats a job's key unless told that the driver's (same) values may win.
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    spec: dict[str, Any] = {"env_vars": env}
    if working_dir is not None:
        upload = working_dir if isinstance(working_dir, Upload) else plan_upload(working_dir)
        spec["working_dir"] = str(upload.working_dir)
        spec["excludes"] = list(upload.excludes)
        # The uploaded conf/ must win over any LLM_PLATFORM_CONF baked into the cluster's environment.
        env["LLM_PLATFORM_CONF"] = ""
    return spec


def _use_auth_token_if_available() -> None:
    """Send the cluster's auth token when one is at hand and RAY_AUTH_MODE does not say otherwise.

    Since Ray 2.5x, `ray start` enables token authentication by default, but the Jobs SDK sends the token only when
    this process runs in token mode. Ray's loader finds the token in `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or
    `~/.ray/auth_token` (KubeRay: the Secret of the cluster's `authOptions`). The helpers are private to Ray, so a
    Ray without them just sends no token.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
        from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # compiled, private: no stub
    except ImportError:
        return
    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        _enable_token_auth()


def connect(address: str | None = None) -> JobSubmissionClient:
    """A Jobs API client; an unreachable address is a one-line error naming it."""
    from ray.job_submission import JobSubmissionClient

    _use_auth_token_if_available()
    address = address or default_address()
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise StageError(f"cannot reach the Ray Jobs API at {address} ({str(e).splitlines()[0]}); "
                         "is the dashboard up and port-forwarded? (docs/cloud.md)") from None


def submit(client: JobSubmissionClient, stage: str, overrides: list[str], working_dir: str | Path | Upload | None,
           extra_env: dict[str, str] | None = None, submission_id: str | None = None,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None) -> str:
    """Submit `llm-platform <stage> <overrides>` and return the submission id."""
    command = entrypoint(stage, overrides)
    spec = runtime_env(working_dir, extra_env)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=command,
                runtime_env=spec,
                submission_id=submission_id,
                metadata={"llm_platform_stage": stage},
                entrypoint_num_cpus=entrypoint_num_cpus,
                entrypoint_num_gpus=entrypoint_num_gpus,
            )
        except RuntimeError as e:
            # A head that has just started answers before its job agent registers; Ray says to retry. Nothing
            # was created yet, so retrying with the same submission id is safe.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def result(client: JobSubmissionClient, submission_id: str) -> JobResult:
    """The job's state now, with the exit code `submit` mirrors."""
    info = client.get_job_info(submission_id)
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        code = 0
    elif status == "STOPPED":
        code = 130
    elif status == "FAILED":
        # The driver's own code when it ran (2 for a StageError); 1 when it never started (bad runtime env).
        code = info.driver_exit_code if info.driver_exit_code not in (None, 0) else 1
    else:
        code = -1
    return JobResult(submission_id, status, code, info.message)


def wait(client: JobSubmissionClient, submission_id: str, timeout_s: float | None = None,
         poll_s: float = 1.0) -> JobResult:
    """Poll until the job reaches a terminal state (or `timeout_s` passes: then its current state)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        res = result(client, submission_id)
        if res.status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return res
        time.sleep(poll_s)


def follow(client: JobSubmissionClient, submission_id: str, out: TextIO | None = None) -> JobResult:
    """Stream the job's logs to `out` until it ends, then return how it ended."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    # The log stream closes when the driver exits; the status may lag it by a moment.
    return wait(client, submission_id)


def list_jobs(client: JobSubmissionClient) -> list[dict[str, Any]]:
    """Submitted jobs, newest first, as plain dicts (id, status, start, end, entrypoint, message)."""
    rows = []
    for job in client.list_jobs():
        if not job.submission_id:  # drivers that connected without the Jobs API
            continue
        rows.append({
            "submission_id": job.submission_id,
            "status": str(getattr(job.status, "value", job.status)),
            "start_time": job.start_time,
            "end_time": job.end_time,
            "entrypoint": job.entrypoint,
            "message": job.message,
        })
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def logs(client: JobSubmissionClient, submission_id: str) -> str:
    """The job's whole log so far."""
    return client.get_job_logs(submission_id)


def stop(client: JobSubmissionClient, submission_id: str) -> bool:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period); True if it was running."""
    return client.stop_job(submission_id)
