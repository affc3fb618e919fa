"""`llm-platform run` end to end with the vLLM backend, as a user types it, from an empty working directory with
the defaults (a relative storage root): data -> train -> register -> eval -> promote -> serve on vLLM -> the sample
query through the OpenAI API. The model is the Llama debug preset at a head size vLLM's CPU attention takes (32).
Runs where vLLM is installed (`make test-vllm`, part of `make test`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_run_serves_the_trained_model_on_vllm(tmp_path):
    pytest.importorskip("vllm")
    cmd = [sys.executable, "-m", "llm_platform", "run", "debug=smoke", "model=llama-debug", "model.hidden_size=128",
           "run.keep_serving=false", "serve.engine.backend=vllm", "serve.engine.vllm.enforce_eager=true",
           "serve.engine.vllm.cpu_kvcache_space_gb=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LLM_PLATFORM_CONF", "LLM_PLATFORM_HOME")}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    status = json.loads((tmp_path / ".llm-platform" / "storage" / "status" / "last_run.json").read_text())
    assert {name: rec["result"] for name, rec in status["stages"].items()} == {
        "data": "ran", "train": "ran", "register": "ran", "eval": "ran", "promote": "ran", "serve": "ran"}
    sample = status["sample"]
    assert sample["model"] and isinstance(sample["completion"], str) and sample["completion"]
    assert "serve" in out.stdout and sample["completion"][:20] in out.stdout  # the summary shows the answer
