"""Key files stay out of git, the Docker build context and the docs' instructions for the checkout (issue #24).

`llm-platform submit` uploads the checkout as a job's working dir, so a keys file kept there travels to the cluster
(test_jobs_unit.py covers the upload itself). These tests hold the other exits shut: `git check-ignore` ignores
the documented names and the usual key-file patterns, `.dockerignore` leaves them out of the build context at any
depth, and docs/cloud.md tells operators to keep serving keys outside the checkout.
"""

from __future__ import annotations

import re
from pathlib import Path

from fixtures.fake_secrets import git_ignored

from llm_platform import jobs

REPO = Path(__file__).resolve().parents[2]
# Names a keys file gets in practice, the documented one first.
KEY_FILES = ["api-keys.txt", "conf/api-keys.txt", "serve-api-keys.txt", "api-keys.prod.txt", "api_keys.txt",
             "certs/tls.pem", "deploy/tls.key", "client.p12", ".env", ".env.prod", "conf/.env", "credentials",
             ".aws/credentials", ".netrc", "id_rsa", "id_ed25519"]
# Tracked files with key-like names that must stay committable (and uploadable).
NOT_KEY_FILES = [".env.example", "conf/serve/cluster.yaml", "llm_platform/serve/auth.py",
                 "tests/fixtures/fake_secrets.py", "llm_platform/data/tokenizer.py", "docs/cloud.md",
                 "cluster/ray-service.serve.yaml"]


def _lines(name: str) -> list[str]:
    return [line.strip() for line in (REPO / name).read_text().splitlines()]


def test_git_ignores_key_files(tmp_path):
    ignored = git_ignored(REPO, tmp_path / "scratch", KEY_FILES + NOT_KEY_FILES)
    assert not set(KEY_FILES) - ignored, f"not ignored: {sorted(set(KEY_FILES) - ignored)}"
    assert not set(NOT_KEY_FILES) & ignored, f"ignored but tracked: {sorted(set(NOT_KEY_FILES) & ignored)}"


def test_gitignore_and_dockerignore_list_every_pattern_submit_leaves_out():
    # One list of key-file patterns (jobs.KEY_FILES), kept out everywhere: git, the upload and the build context.
    # .dockerignore patterns match from the context's root, so each is listed under **/ to match at any depth.
    gitignore, dockerignore = _lines(".gitignore"), _lines(".dockerignore")
    for pattern in jobs.KEY_FILES:
        assert pattern in gitignore, f".gitignore lacks {pattern}"
        docker_pattern = f"!**/{pattern[1:]}" if pattern.startswith("!") else f"**/{pattern}"
        assert docker_pattern in dockerignore, f".dockerignore lacks {docker_pattern}"


def test_docs_keep_serving_keys_outside_the_checkout():
    # Every keys-file path the docs hand to a shell lives under the user's config folder, not in the checkout
    # (where `submit` would find it and the working dir is uploaded from).
    outside = re.compile(r"(\$HOME|~)/\.config/llm-platform/[\w.-]+$")
    for doc in ("docs/cloud.md", "README.md"):
        paths = re.findall(r"[\w$~./-]*api[-_]keys[\w.-]*\.txt", (REPO / doc).read_text())
        bad = [p for p in paths if not outside.match(p)]
        assert not bad, f"{doc} puts a keys file in the checkout: {bad}"
    assert re.search(r"\$HOME/\.config/llm-platform/api-keys\.txt", (REPO / "docs/cloud.md").read_text())
