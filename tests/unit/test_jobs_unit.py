"""Argument handling of `llm-platform submit` and `llm-platform jobs`, and the job's runtime env (no Ray started)."""

from __future__ import annotations

import os

import pytest

from llm_platform import jobs
from llm_platform.commands import jobs as jobs_cmd
from llm_platform.commands import submit as submit_cmd
from llm_platform.errors import ConfigError


def test_submit_parses_stage_overrides_and_options_in_any_order():
    args = submit_cmd.parse(["train", "debug=smoke", "--address", "http://h:8265", "storage.root=/x", "--no-wait",
                             "--env", "FOO=1"])
    assert args.stage == "train"
    assert args.overrides == ["debug=smoke", "storage.root=/x"]
    assert args.address == "http://h:8265" and args.no_wait and args.env == ["FOO=1"]
    assert not args.installed and args.working_dir is None


def test_submit_rejects_unknown_stage_and_conflicting_code_options(capsys):
    with pytest.raises(SystemExit) as e:
        submit_cmd.parse(["registry", "x=1"])
    assert e.value.code == 2
    assert "invalid choice: 'registry'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        submit_cmd.parse(["data", "--installed", "--working-dir", "."])


def test_jobs_subcommands_parse():
    assert jobs_cmd.parse(["list", "--address", "http://h:1"]).action == "list"
    logs = jobs_cmd.parse(["logs", "raysubmit_1", "-f"])
    assert (logs.action, logs.job_id, logs.follow) == ("logs", "raysubmit_1", True)
    stop = jobs_cmd.parse(["stop", "raysubmit_1", "--wait"])
    assert (stop.action, stop.job_id, stop.wait) == ("stop", "raysubmit_1", True)
    with pytest.raises(SystemExit):
        jobs_cmd.parse(["logs"])  # the id is required


def test_entrypoint_quotes_overrides_and_refuses_local_tools():
    assert jobs.entrypoint("data", ["debug=smoke", "data.name=my data"]) == \
        "llm-platform data debug=smoke 'data.name=my data'"
    with pytest.raises(ConfigError, match="'query' cannot run as a job"):
        jobs.entrypoint("query", [])


def test_parse_env_refuses_credentials_and_malformed_pairs():
    assert jobs.parse_env(["A=1", "B=x=y", "TOKENIZERS_PARALLELISM=false", "MLFLOW_TRACKING_URI=https://mlflow"]) \
        == {"A": "1", "B": "x=y", "TOKENIZERS_PARALLELISM": "false", "MLFLOW_TRACKING_URI": "https://mlflow"}
    for bad in ("AWS_SECRET_ACCESS_KEY=s", "AWS_ACCESS_KEY_ID=k", "AWS_SESSION_TOKEN=t", "HF_TOKEN=t",
                "AWS_PROFILE=prod", "DB_PASSWORD=p", "OPENAI_API_KEY=sk", "ANTHROPIC_API_KEY=k", "MY_API_KEYS=a,b",
                "LLM_PLATFORM_API_KEYS=a", "WANDB_API_KEY=w", "MLFLOW_TRACKING_TOKEN=t", "db_passwd=p",
                "GITHUB_PAT_PASSPHRASE=p", "SSH_PRIVATE=x", "HTTP_AUTHORIZATION=Bearer x",
                "MLFLOW_TRACKING_URI=https://user:pw@mlflow.example.com"):
        with pytest.raises(ConfigError, match="credentials are never sent"):
            jobs.parse_env([bad])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        jobs.parse_env(["NOEQUALS"])


def test_runtime_env_forwards_storage_settings_but_never_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("LLM_PLATFORM_BUCKET", "my-bucket")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    spec = jobs.runtime_env(None, {"EXTRA": "1"})
    env = spec["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["LLM_PLATFORM_BUCKET"] == "my-bucket"
    assert env["AWS_REGION"] == "eu-west-1" and env["EXTRA"] == "1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    assert "working_dir" not in spec  # the installed package
    with pytest.raises(ConfigError, match="refusing to send credentials"):
        jobs.runtime_env(None, {"MY_TOKEN": "x"})


def test_runtime_env_uploads_a_checkout_without_environments_or_state(tmp_path):
    root = jobs.project_root()
    assert root is not None and (root / "conf").is_dir()  # the tests run from a checkout
    spec = jobs.runtime_env(root)
    assert spec["working_dir"] == str(root)
    for pattern in (".venv", ".venv-*", ".git", "*.tfstate", "terraform/.terraform", ".llm-platform"):
        assert pattern in spec["excludes"]
    # The uploaded conf/ wins over an LLM_PLATFORM_CONF of the cluster's image.
    assert spec["env_vars"]["LLM_PLATFORM_CONF"] == ""
    with pytest.raises(ConfigError, match="no conf/ folder"):
        jobs.runtime_env(tmp_path)


def test_check_overrides_names_the_bad_key():
    submit_cmd.check_overrides("data", ["debug=smoke", "data.seq_len=32"])
    with pytest.raises(ConfigError, match="dat"):
        submit_cmd.check_overrides("data", ["dat.seq_len=3"])
    with pytest.raises(ConfigError, match="ten"):
        submit_cmd.check_overrides("data", ["data.seq_len=ten"])


def test_default_address_prefers_an_http_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not the Jobs API
    assert jobs.default_address() == jobs.DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert jobs.default_address() == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example.com")
    assert jobs.default_address() == "https://ray.example.com"


def test_submit_fails_cleanly_when_the_cluster_is_unreachable(capsys, monkeypatch):
    import socket

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # keep token mode out of this process's Ray config
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as e:
        submit_cmd.main(["data", "debug=smoke", "--address", f"http://127.0.0.1:{port}", "--no-check"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray Jobs API at http://127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_submit_refuses_each_secret_env_before_contacting_the_cluster(capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for name in ("OPENAI_API_KEY", "LLM_PLATFORM_API_KEYS", "SERVICE_API_KEYS", "WANDB_API_KEY"):
        with pytest.raises(SystemExit) as e:  # port 9: nothing listens; the refusal must come first
            submit_cmd.main(["data", "--env", f"{name}=sentinel", "--address", "http://127.0.0.1:9", "--no-check"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--env {name}: credentials are never sent" in err and "sentinel" not in err


def test_submit_refuses_a_config_typo_before_contacting_the_cluster(capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(SystemExit) as e:
        submit_cmd.main(["data", "dat.seq_len=3", "--address", "http://127.0.0.1:9"])
    assert e.value.code == 2
    assert "Key 'dat' not in" in capsys.readouterr().err


class _Info:
    def __init__(self, status, code=None, message=None):
        self.status, self.driver_exit_code, self.message = status, code, message


class _Client:
    def __init__(self, info):
        self.info = info

    def get_job_info(self, _id):
        return self.info


@pytest.mark.parametrize("status,code,expected", [("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", None, 1),
                                                  ("FAILED", 0, 1), ("STOPPED", None, 130), ("RUNNING", None, -1)])
def test_exit_status_is_mirrored(status, code, expected):
    assert jobs.result(_Client(_Info(status, code)), "id").exit_code == expected


# Issue #24: a keys file in the checkout must not reach the cluster with the working dir.
SERVING_KEYS = "Jb0m3bq8dZc2lqN6o2mV9m3b6v3cPq1yR7x9QdW5o0k\nf4b8Yc5rT2nV7kL1pQ9sW3xZ6mB0jH8gD2aE5uI7oYk\n"
PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
AWS_PROFILE = "[default]\naws_access_key_id = AKIAZ7Q2W3E4R5T6Y7U8\n" \
              "aws_secret_access_key = q8Jm2Lw0Xn5Vb3Kc7Rz1Tp4Ys6Hd9Ga2Fe5Uo8Ii\n"


def _checkout(root, files):
    """A checkout-like folder (conf/ and a package) with `files` ({relative path: text}) added."""
    for rel, text in {"conf/train.yaml": "max_steps: 1\n", "llm_platform/__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _ray_would_upload(spec, tmp_path):
    """The files Ray's own packaging puts in the working_dir package for `spec` (no cluster: the zip it uploads)."""
    import zipfile

    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    package = tmp_path / "package.zip"
    create_package(spec["working_dir"], package, include_gitignore=include_gitignore,
                   excludes=ray_constants.get_runtime_env_default_excludes() + spec["excludes"])
    with zipfile.ZipFile(package) as z:
        return {name for name in z.namelist() if not name.endswith("/")}


def test_upload_leaves_key_files_out_even_without_a_gitignore(tmp_path):
    # A --working-dir without our .gitignore (or RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1): only `excludes` stand between
    # the keys and the cluster's package store.
    root = _checkout(tmp_path / "checkout", {"api-keys.txt": SERVING_KEYS, "conf/serve-api-keys.txt": SERVING_KEYS,
                                             "certs/tls.pem": PRIVATE_KEY, "deploy/tls.key": PRIVATE_KEY,
                                             ".env": "WANDB_API_KEY=w\n", ".env.example": "WANDB_API_KEY=\n",
                                             "conf/tokenizer/bpe.yaml": "vocab_size: 64\n"})
    uploaded = _ray_would_upload(jobs.runtime_env(root), tmp_path)
    assert uploaded == {"conf/train.yaml", "llm_platform/__init__.py", ".env.example", "conf/tokenizer/bpe.yaml"}


def test_plan_upload_names_the_key_files_that_only_its_excludes_keep_out(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    root = _checkout(tmp_path, {"api-keys.txt": SERVING_KEYS, "certs/tls.pem": PRIVATE_KEY,
                                ".gitignore": "api-keys.txt\n"})
    assert jobs.plan_upload(root).left_out == ["certs/tls.pem"]  # .gitignore already keeps api-keys.txt out
    # Ray stops reading .gitignore under RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, and the plan follows it.
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    plan = jobs.plan_upload(root)
    assert plan.left_out == ["api-keys.txt", "certs/tls.pem"]
    assert "api-keys.txt" not in _ray_would_upload(jobs.runtime_env(plan), tmp_path)


def test_plan_upload_refuses_a_secret_under_a_name_no_pattern_covers(tmp_path):
    root = _checkout(tmp_path, {"conf/hf_token": "hf_" + "aBcD3fGh1jKlMn0pQrStUvWxYz12345678\n",
                                "deploy/aws-credentials.ini": AWS_PROFILE, "ops/deploy_key": PRIVATE_KEY,
                                "conf/serve/keys.list": SERVING_KEYS,
                                # Key-like names without a secret in them go up as usual.
                                "llm_platform/serve/auth.py": "API_KEY_ENV = 'LLM_PLATFORM_API_KEYS'\n",
                                "llm_platform/data/tokenizer.py": "def tokenize(text):\n    return text.split()\n",
                                "docs/secrets.md": "Keep keys in $HOME/.config/llm-platform/api-keys.txt.\n"})
    with pytest.raises(ConfigError) as e:
        jobs.plan_upload(root)
    message = str(e.value)
    for rel in ("conf/hf_token", "deploy/aws-credentials.ini", "ops/deploy_key", "conf/serve/keys.list"):
        assert rel in message
    for rel in ("auth.py", "tokenizer.py", "secrets.md"):
        assert rel not in message
    assert ".config/llm-platform" in message and ".rayignore" in message
    assert "q8Jm2Lw0" not in message and "BEGIN" not in message  # the refusal never echoes the secret
    # The remedy it names works: a .rayignore (which Ray always honours) keeps them out.
    (root / ".rayignore").write_text("hf_token\naws-credentials.ini\ndeploy_key\nkeys.list\n")
    assert jobs.plan_upload(root).left_out == []


def test_submit_says_what_it_leaves_out_and_refuses_before_contacting_the_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    root = _checkout(tmp_path / "checkout", {"api-keys.txt": SERVING_KEYS})
    with pytest.raises(SystemExit):
        submit_cmd.main(["data", "--working-dir", str(root), "--address", "http://127.0.0.1:9", "--no-check"])
    err = capsys.readouterr().err
    assert "leaving api-keys.txt out of the upload" in err and "Jb0m3bq8" not in err
    (root / "notes").mkdir()
    (root / "notes" / "prod-key.txt").write_text(PRIVATE_KEY)
    with pytest.raises(SystemExit) as e:
        submit_cmd.main(["data", "--working-dir", str(root), "--address", "http://127.0.0.1:9", "--no-check"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "notes/prod-key.txt" in err and "looks like a private key" in err
    assert "cannot reach" not in err  # refused before contacting the cluster


def test_the_checkout_itself_uploads_without_refusal():
    root = jobs.project_root()
    assert root is not None
    jobs.plan_upload(root)  # no committed file looks like a secret
