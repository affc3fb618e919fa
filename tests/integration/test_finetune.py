"""Fine-tuning third-party-like checkpoints on chats, on 2 CPU workers: a full fine-tune of the GPT-2 layout
through the data stage and the launcher, and `llm-platform run experiment=finetune-lora` end to end on the
Llama-3 layout, then a chat completion from the endpoint. Two training runs in all (CI time): the masks, renders,
hash checks and the LoRA/full exports of the other layout are unit tests (tests/unit/test_finetune_units.py)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fixtures.checkpoints import gpt2_checkpoint, llama3_checkpoint, tokenizer_files, write_chats
from fixtures.training import ordered_rows, read_rows

from llm_platform import storage
from llm_platform.config import compose
from llm_platform.data.dataset import open_dataset
from llm_platform.train.objectives import count_targets, loss_sum, prepare_batch

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPECIAL = {"eos": 0, "pad": 0, "mask": None}


def short(extra: list[str]) -> list[str]:
    return ["data.seq_len=96", "data.val_fraction=0.1", "train.micro_batch_size=4", "train.max_steps=8",
            "train.optimizer.warmup_steps=0", "train.log_interval_steps=1", "train.eval_interval_steps=8",
            "train.checkpoint.interval_steps=8", "train.eval_batches=1", "train.shuffle_buffer_rows=0",
            "train.max_failures=0", "scaling.num_workers=2", *extra]


def mean_loss(folder, rows: dict[str, np.ndarray]) -> float:
    """The HF model's own loss (transformers shifts the labels itself) on `rows`, in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    # Packed rows (data.pack_supervised, the default): position ids and no mask, and no KV cache, which would turn
    # off transformers' per-example mask (llm_platform/models/packing.py); training models run without one.
    where = ({"position_ids": torch.as_tensor(rows["position_ids"])} if "position_ids" in rows
             else {"attention_mask": torch.as_tensor(rows["attention_mask"])})
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(rows["input_ids"]), labels=torch.as_tensor(rows["labels"]),
                    use_cache=False, **where)
    # Cross-check: the platform's loss on the same rows (what the training loop computes).
    inputs, targets = prepare_batch("sft", rows, special=SPECIAL, vocab_size=model.config.vocab_size)
    with torch.no_grad():
        ours = loss_sum(model(**inputs, use_cache=False).logits, targets) / count_targets(targets)
    assert float(ours) == pytest.approx(float(out.loss), abs=1e-5)
    return float(out.loss)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    return path, write_chats(path)


def test_full_finetune_of_a_gpt2_layout(ray_session, tmp_path, chats):
    from llm_platform.data.pipeline import build_dataset
    from llm_platform.train.launcher import launch

    base = gpt2_checkpoint(tmp_path / "gpt2")
    path, bad = chats
    root = str(tmp_path / "store")
    cfg = compose("train", short(["experiment=finetune", f"model.pretrained={base}", f"data.sources=[{path}]",
                                  f"storage.root={root}", "train.optimizer.lr=3e-3"]))
    data = build_dataset(cfg.data, cfg.tokenizer, root, progress=False)
    manifest = data.manifest
    # Bad records: counted per reason, named by file and line; every good record kept.
    assert {r: manifest["counts"]["dropped"].get(r) for r in bad} == {r: 1 for r in bad}
    assert {(s["reason"].split(":")[0], s["line"]) for s in manifest["skipped"]} == {(r, n) for r, n in bad.items()}
    splits = manifest["splits"]
    # Packed chats (data.pack_supervised, the default): the manifest counts the examples in its rows.
    examples = splits["train"]["packing"]["examples"] + splits["val"]["packing"]["examples"]
    assert examples + manifest["counts"]["exact_duplicates"] == 96
    # The model's own tokenizer, unaltered: same hash, same length, no pad or mask token added.
    assert manifest["tokenizer"]["sha256"] == manifest["tokenizer"]["base_sha256"] == storage.file_sha256(
        str(base / "tokenizer.json"))
    assert manifest["tokenizer"]["vocab_size"] == 350 and manifest["tokenizer"]["mask_token_id"] is None

    result = launch(cfg.model, cfg.train, cfg.scaling, data.uri, root)
    export = storage.filesystem(result.export_uri)[1]
    assert tokenizer_files(Path(export)) == tokenizer_files(base)
    assert (Path(export) / "config.json").read_bytes() == (base / "config.json").read_bytes()  # vocab unchanged
    # Step 1's loss (before any update, 2 workers x 4 rows) is the HF model's own loss on those 8 rows.
    rows = read_rows(data.uri, "train")
    first = {k: v[:8] for k, v in ordered_rows(data.uri, partitions=8).items()}  # its first global micro-batch
    metrics = storage.read_text(storage.join(result.run_uri, "metrics.jsonl")).splitlines()
    logged = [r for r in map(json.loads, metrics) if r.get("step") == 1 and "train/loss" in r]
    assert logged[0]["train/loss"] == pytest.approx(mean_loss(base, first), abs=1e-5)
    sample = {k: v[:32] for k, v in rows.items()}
    assert mean_loss(export, sample) < mean_loss(base, sample) - 0.1


def test_run_finetune_lora_end_to_end_then_chat(ray_session, tmp_path, chats):
    from conftest import free_port
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_platform import registry
    from llm_platform.runner import run_all

    base = llama3_checkpoint(tmp_path / "llama3")
    path, _ = chats
    root = str(tmp_path / "store")
    overrides = short(["experiment=finetune-lora", f"model.pretrained={base}", f"data.sources=[{path}]",
                       f"storage.root={root}", f"serve.http.port={free_port()}", "run.keep_serving=false",
                       "eval.bias.bootstrap_samples=50", "train.optimizer.lr=2e-2", "model.lora.rank=8"])
    try:
        summary = run_all(compose("run", overrides))
        assert [s["result"] for s in summary.stages.values()] == ["ran"] * 6, summary.stages  # promote too
        version = registry.latest(root, "finetune-lora")
        folder = Path(registry.materialize(version.uri))
        # Only the weights changed: architecture, config and tokenizer files are the base's, byte for byte.
        for name in ("config.json", "generation_config.json", *tokenizer_files(base)):
            assert (folder / name).read_bytes() == (base / name).read_bytes(), name
        assert type(AutoModelForCausalLM.from_pretrained(str(folder))).__name__ == "LlamaForCausalLM"
        assert len(AutoTokenizer.from_pretrained(str(folder))) == 356
        rows = {k: v[:32] for k, v in read_rows(summary.chain["dataset"], "train").items()}
        assert mean_loss(folder, rows) < mean_loss(base, rows) - 0.1
        # The endpoint renders chats with the model's own template (Llama 3 headers), and answers.
        body = {"model": "finetune-lora", "messages": [{"role": "user", "content": "What color is the sky?"}],
                "max_tokens": 8, "temperature": 0}
        models = httpx.get(f"{summary.endpoint}/v1/models", timeout=60).json()["data"]
        body["model"] = models[0]["id"]
        reply = httpx.post(f"{summary.endpoint}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        answer = reply.json()["choices"][0]["message"]
        assert answer["role"] == "assistant" and isinstance(answer["content"], str)
        assert open_dataset(summary.chain["dataset"]).kind == "chat"
    finally:
        serve.shutdown()
