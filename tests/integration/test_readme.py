"""The user's path as written: the wheel installed outside the repository, every README command, an empty folder.

One module-scoped fixture builds the wheel from this checkout and installs it into a fresh virtual environment in a
temporary folder. The environment borrows the test venv's third-party packages through a `.pth` path line (nothing
downloads here), but not its editable install of this project: a `.pth` file inside a borrowed folder is not
processed, so `llm_platform` can only come from the wheel. Then every shell command of README.md's code blocks runs,
in README order, from one empty working directory with the default (relative) `storage.root`, through the wheel's
`llm-platform` entry point, as a new user would type them.

A command marked `# [needs a cluster]`, `# [needs a GPU]` or `# [needs AWS]` is composed (`--cfg job`) with its own
overrides instead. A README command that no rule below knows fails the test: add a rule (and what it must show).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
STAGES = ["data", "train", "register", "eval", "promote", "serve"]
NEEDS = re.compile(r"#\s*\[needs (a cluster|a GPU|AWS)\]")
# One xdist worker for the whole module: the wheel fixture is built once, and the story's endpoint holds port 8000.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("readme")]


def readme_commands(text: str) -> list[str]:
    """Shell commands of the ```bash blocks, continuation lines joined, in order (comments kept: they carry marks)."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            if (not line.strip() or line.lstrip().startswith("#")) and not pending:
                continue  # blank lines and comment lines
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].rstrip() + " "
                continue
            commands.append((pending + line.strip()).strip())
            pending = ""
    return commands


def command_part(command: str) -> str:
    """The command as the shell sees it, without its trailing comment (a `#` after a space, outside quotes)."""
    quote = ""
    for i, ch in enumerate(command):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command.strip()


def test_readme_commands_are_parsed_with_their_marks():
    commands = readme_commands(README.read_text())
    assert commands[:2] == [c for c in commands if c.startswith("make ")][:2]
    assert any(NEEDS.search(c) for c in commands)
    joined = [c for c in commands if "curl" in c]
    assert joined and "-d" in joined[0], "continuation lines are joined into one command"
    assert command_part("llm-platform data --help   # Hydra's help") == "llm-platform data --help"
    assert command_part("echo '{\"a\": \"#1\"}' > t.jsonl  # make it") == "echo '{\"a\": \"#1\"}' > t.jsonl"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel of this checkout in a fresh venv outside the repository; returns its bin dir and env."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    # Built from a copy of the checkout's files (tracked, and untracked but not ignored), never in the checkout:
    # setuptools builds in `<source>/build/`, so two builds at once there (two pytest workers) raced and shipped a
    # wheel without the package, and a stale `build/lib` could ship modules the checkout no longer has.
    source = tmp / "source"
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(source)], check=True, cwd=tmp, capture_output=True)
    wheel = next(dist.glob("llm_platform-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "borrowed_test_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "LLM_PLATFORM", "AWS_ENDPOINT", "PYTEST", "VIRTUAL_ENV", "RAY_ADDRESS",
                                "RAY_API_SERVER_ADDRESS"))}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", RAY_TMPDIR=f"/tmp/llmp-readme-{os.getpid()}",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return {"wheel": wheel, "venv": venv, "bin": venv / "bin", "env": env, "site": site}


def test_wheel_holds_the_configs_and_runs_outside_the_repository(installed, tmp_path):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "llm_platform/conf/base.yaml" in names and "llm_platform/conf/debug/smoke.yaml" in names
    assert not [n for n in names if n.startswith("llm_platform/conf/local/")], "personal overrides must not ship"
    out = subprocess.run([str(installed["bin"] / "python"), "-c",
                          "import llm_platform, llm_platform.config as c; print(llm_platform.__file__); "
                          "print(c.conf_dir())"],
                         cwd=tmp_path, env=installed["env"], capture_output=True, text=True, check=True)
    package, conf = out.stdout.split()
    assert package.startswith(str(installed["site"])), package  # the wheel's copy, not the checkout
    assert conf == str(installed["site"] / "llm_platform" / "conf")
    # Every runtime requirement of the wheel is installed (what `pip install llm-platform` would have pulled).
    script = ("import importlib.metadata as m\nfrom packaging.requirements import Requirement\n"
              "def ok(r):\n    try:\n        return r.specifier.contains(m.version(r.name), prereleases=True)\n"
              "    except m.PackageNotFoundError:\n        return False\n"
              "reqs = [Requirement(s) for s in m.requires('llm-platform') or []]\n"
              "print([str(r) for r in reqs if r.marker is None and not ok(r)])\n")
    out = subprocess.run([str(installed["bin"] / "python"), "-c", script], cwd=tmp_path, env=installed["env"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


class Story:
    """README commands run one after another in one working directory, as a user would."""

    def __init__(self, installed: dict, cwd: Path):
        self.env, self.cwd = dict(installed["env"]), cwd
        self.server: subprocess.Popen | None = None
        self.seconds: list[tuple[float, str]] = []

    def sh(self, command: str, *, timeout: float = 900, ok_codes=(0,)) -> subprocess.CompletedProcess:
        """Run a command to its end in its own process group; on a timeout, the group is killed and the failure
        shows the command's last output and the tail of the newest stage log (where Ray's own lines went)."""
        start = time.perf_counter()
        proc = subprocess.Popen(["bash", "-c", command], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=60)
            logs = sorted((self.cwd / ".llm-platform" / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
            tail = logs[-1].read_text(errors="replace")[-6000:] if logs else "(no log file)"
            pytest.fail(f"README command still running after {timeout}s: {command}\n--- stdout\n{stdout[-4000:]}\n"
                        f"--- stderr\n{stderr[-2000:]}\n--- {logs[-1] if logs else 'log'}\n{tail}")
        self.seconds.append((time.perf_counter() - start, command[:70]))
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert done.returncode in ok_codes, (f"README command failed ({done.returncode}): {command}\n"
                                             f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}")
        return done

    def start(self, command: str, ready: str, timeout: float = 600) -> subprocess.Popen:
        """A command that keeps running (a server): started in its own process group, returned once `ready`
        appears in its output."""
        log = open(self.cwd / f"bg-{len(self.seconds)}.log", "w+")
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.cwd, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        proc.log = log  # type: ignore[attr-defined]
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = Path(log.name).read_text()
            if ready in text:
                return proc
            assert proc.poll() is None, f"{command} exited {proc.returncode} before it was ready:\n{text[-4000:]}"
            time.sleep(1)
        self.stop(proc)
        pytest.fail(f"{command} not ready after {timeout}s:\n{Path(log.name).read_text()[-4000:]}")

    @staticmethod
    def stop(proc: subprocess.Popen) -> tuple[int | None, str]:
        """Ctrl-C, as a user stops it: SIGINT to the CLI (whose handler drains it even when the shell that started
        it made SIGINT ignored); returns the exit code (None: it had to be killed) and the output. A group SIGKILL
        then takes any of its local Ray's processes that outlived it."""
        code = None
        try:
            os.kill(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=120)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        return code, Path(proc.log.name).read_text()  # type: ignore[attr-defined]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.timeout(3600)  # a dozen stages, each its own process and local Ray: minutes on 2 cores
def test_every_readme_command_works_as_written(installed, tmp_path, reliability_report):
    """Each README command in order; the checks after each are what the README promises of it."""
    commands = readme_commands(README.read_text())
    work = tmp_path / "empty"
    work.mkdir()
    story = Story(installed, work)
    storage = work / ".llm-platform" / "storage"
    seen: list[str] = []
    try:
        for raw in commands:
            cmd = command_part(raw)
            mark = NEEDS.search(raw)
            if mark:
                # Composed with its own overrides: `submit <stage> ... --address X` composes `<stage> ...`.
                words = shlex.split(cmd)
                assert words[0] == "llm-platform", raw
                if words[1] == "submit":
                    words = [w for w in words[:1] + words[2:] if not w.startswith("--address")
                             and not w.startswith("http")]
                out = story.sh(shlex.join(words + ["--cfg", "job"])).stdout
                assert "storage:" in out and "train:" in out, out[-2000:]
                seen.append(f"composed: {raw}")
                continue
            if cmd == "make demo":
                # What `make demo` runs after its set-up, run here through the installed entry point.
                recipe = subprocess.run(["make", "-n", "-s", "demo"], cwd=REPO, capture_output=True, text=True,
                                        env={**os.environ, "MAKEFLAGS": ""}).stdout.strip().splitlines()[-1]
                demo = re.sub(r"^\S*/llm-platform ", "llm-platform ", recipe)
                assert demo == "llm-platform run debug=smoke run.keep_serving=false", recipe
                started = time.perf_counter()
                out = story.sh(demo)
                wall = time.perf_counter() - started
                console = _lines(out.stdout + out.stderr)
                reliability_report("demo console", lines=len(console), wall_s=round(wall, 1))
                print("the demo's console:\n" + "\n".join(console))
                assert len(console) < 40, "\n".join(console)
                assert not [line for line in console if "Deprecat" in line or " INFO " in line], "\n".join(console)
                run_dirs = list((storage / "runs").iterdir())
                assert len(run_dirs) == 1 and (run_dirs[0] / "metrics.jsonl").is_file(), run_dirs
                assert (run_dirs[0] / "tensorboard").is_dir()
                assert "sample query" in out.stdout
                ran = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()
                       if line.split()[:1] and line.split()[0] in STAGES}
                assert ran == dict.fromkeys(STAGES, "ran"), out.stdout
                assert (storage / "registry" / "debug" / "LATEST").read_text().strip() == "v0001"
                record = json.loads((storage / "status" / "last_run.json").read_text())
                for key in ("dataset", "run", "eval_report", "endpoint", "tokenizer_sha256", "model_version"):
                    assert record["chain"][key], key
                # The run's cost: CPU workers priced per vCPU (plan.prices.cpu), so a few cents at most, not nothing.
                assert re.fullmatch(r"\$[0-9.e-]+ \(0 GPU-hours, [0-9.e-]+ h; on_demand prices as of \d{4}-\d\d-\d\d\)",
                                    record["chain"]["run_cost"]), record["chain"]["run_cost"]
                assert (Path(record["chain"]["eval_report"]) / "metrics.json").is_file()
                seen.append(raw)
                continue
            if cmd == "make test":
                ci = (REPO / ".ci" / "run").read_text()
                assert re.search(r"^make test$", ci, flags=re.M), "CI must call the README's test command"
                seen.append(raw)
                continue
            if cmd.startswith("llm-platform serve "):
                if story.server:
                    story.stop(story.server)
                story.server = story.start(cmd, ready="serving ")
                _wait_http("http://127.0.0.1:8000/v1/models")
                seen.append(raw)
                continue
            if cmd.startswith("llm-platform run ") and "keep_serving=false" not in cmd and "--until" not in cmd:
                if story.server:  # one endpoint on port 8000 at a time
                    story.stop(story.server)
                    story.server = None
                proc = story.start(cmd, ready="Ctrl-C stops")
                code, text = story.stop(proc)
                assert code == 0, text[-4000:]
                assert "sample query" in text
                seen.append(raw)
                continue
            out = story.sh(cmd, ok_codes=(0, 1) if "compare_to" in cmd else (0,))
            _check(cmd, out, work)
            seen.append(raw)
    finally:
        if story.server:
            story.stop(story.server)
    print("README commands by seconds:\n" + "\n".join(f"{s:7.1f}  {c}" for s, c in sorted(story.seconds)[::-1]))
    assert [c.removeprefix("composed: ") for c in seen] == commands, "every README command ran (or was composed)"


def _wait_http(url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"{url} did not answer in {timeout}s")


def _check(cmd: str, out: subprocess.CompletedProcess, work: Path) -> None:
    """What each command must show besides exiting 0."""
    text = out.stdout
    if cmd == "llm-platform --help":
        assert "stages:" in text and "tune" in text
    elif cmd == "llm-platform data --help":
        assert "data" in text and "Traceback" not in out.stderr
    elif cmd in ("llm-platform data debug=smoke", "llm-platform train debug=smoke"):
        # The demo built this dataset and trained this run: answered at once, without starting a Ray.
        assert "starting a local Ray" not in text + out.stderr, text
        assert ("complete" in text or "reused" in text or "export:" in text), text
    elif cmd == "llm-platform eval eval.model=registry:debug":
        # A smoke model's few val records score faster in the process than on an actor pool: no Ray starts.
        assert "in this process" in text + out.stderr and "starting a local Ray" not in text + out.stderr, text
    elif cmd.endswith("--cfg job"):
        assert "data:" in text and "seq_len:" in text
    elif cmd.startswith("llm-platform tune "):
        assert "winner:" in text and "registered: registry:debug/" in text
        assert list((work / ".llm-platform" / "storage" / "sweeps").iterdir())
        # Trials run in Ray's own working directories: their records still land in runs/<run>/ of this folder.
        trials = list((work / ".llm-platform" / "storage" / "runs").glob("debug-sweep-*"))
        assert trials and all((t / "metrics.jsonl").is_file() for t in trials), trials
    elif cmd.startswith("llm-platform registry list"):
        assert "debug" in text
    elif cmd.startswith("curl "):
        assert json.loads(text)["choices"][0]["text"] is not None
    elif cmd.startswith("llm-platform status"):
        order = [line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.split()
                 and line.split()[0] in STAGES]
        assert order == sorted(order, key=STAGES.index), text
        assert order[:1] == ["data"] or order[:1] == ["train"], text
        assert re.search(r"run_cost\s+\$", text), text
    elif cmd.startswith("llm-platform run ") and "--until eval" in cmd:
        results = {line.split()[0]: line.split()[1] for line in text.splitlines()
                   if line.split()[:1] and line.split()[0] in STAGES}
        # No promote stage in this slice, and v0001 (promoted by the run before) is LATEST: no "held" row either.
        assert results == {"train": "skipped", "register": "skipped", "eval": "skipped"}, text
        assert "starting a local Ray" not in text + out.stderr, text  # nothing to do: no Ray started
    elif cmd.startswith("llm-platform explain "):
        assert list((work / "explain").iterdir())
