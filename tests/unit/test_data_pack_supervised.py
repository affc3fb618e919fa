"""Packed supervised data (`data.pack_supervised`): the packer against a plain reference, and a model trained on
packed rows seeing exactly the per-example loss it would see unpacked."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import data_reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_platform.config import compose
from llm_platform.config.model import ModelConfig
from llm_platform.data import pack, pipeline
from llm_platform.data.dataset import open_dataset
from llm_platform.evaluate import perplexity
from llm_platform.models.build import build_model
from llm_platform.train import objectives
from llm_platform.train.reader import SplitFiles

VOCAB = 97
SPECIAL = {"eos": 0, "pad": 1, "mask": 2}
SEQ_LEN = 48


def examples_of(lengths: list[int], seed: int) -> list[tuple[list[int], list[int]]]:
    """Random examples of these lengths: (ids, labels), about half of the labels -100 (a prompt, a user turn)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, VOCAB, size=n).tolist()
        labels = [t if rng.random() < 0.5 else -100 for t in ids]
        out.append((ids, labels))
    return out


def packed(examples, seq_len: int, window: int = pack.PACK_WINDOW_EXAMPLES):
    flat_ids = np.asarray([t for ids, _ in examples for t in ids], np.int32)
    flat_labels = np.asarray([t for _, labels in examples for t in labels], np.int32)
    lengths = np.asarray([len(ids) for ids, _ in examples], np.int32)
    return pack.pack_examples(flat_ids, flat_labels, lengths, seq_len=seq_len, pad_id=SPECIAL["pad"], window=window)


# ------------------------------------------------------------------------------------------------- the packer
@settings(max_examples=60)
@given(st.lists(st.integers(1, 40), max_size=40), st.integers(40, 64), st.sampled_from([1, 3, 8, 256]),
       st.integers(0, 2**16))
def test_packer_equals_the_plain_reference_and_keeps_every_example_whole(lengths, seq_len, window, seed):
    examples = examples_of(lengths, seed)
    columns, counts = packed(examples, seq_len, window)
    want = ref.pack_rows(examples, seq_len, SPECIAL["pad"], window)
    assert {k: v.tolist() for k, v in columns.items()} == want
    rows = len(want["input_ids"])
    assert all(v.shape == (rows, seq_len) for v in columns.values())  # never longer than seq_len
    assert counts == {"examples": len(examples), "rows": rows, "tokens": sum(lengths)}
    # Each example once, whole and in one row; position ids restart; labels as unpacked but the never-scored first.
    found = []
    for r in range(rows):
        ex = columns["example_ids"][r]
        assert columns["attention_mask"][r].tolist() == (ex > 0).astype(int).tolist()
        for place in range(1, int(ex.max(initial=0)) + 1):
            at = np.flatnonzero(ex == place)
            assert at.tolist() == list(range(at[0], at[0] + len(at)))  # contiguous
            assert columns["position_ids"][r, at].tolist() == list(range(len(at)))
            found.append((columns["input_ids"][r, at].tolist(), columns["labels"][r, at].tolist()))
    assert sorted(ids for ids, _ in found) == sorted(ids for ids, _ in examples)
    for ids, labels in examples:
        assert (ids, [-100] + labels[1:]) in found
    summary = pack.packing_summary(counts["examples"], rows, counts["tokens"], seq_len)
    assert summary["fill_rate"] == (columns["attention_mask"].sum() / (rows * seq_len) if rows else 0.0)
    assert summary["examples_per_row"] == (len(examples) / rows if rows else 0.0)


def test_packing_fills_rows_where_padding_would_not():
    lengths = np.clip(np.random.default_rng(0).lognormal(np.log(150), 1.0, 2000).round(), 2, 1024).astype(int)
    plan = pack.plan_rows(lengths.tolist(), 1024)
    assert sorted(i for row in plan for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[row]) <= 1024 for row in plan)
    assert lengths.sum() / (len(plan) * 1024) > 0.95  # padded: about 0.23


# ------------------------------------------------------------------------------------- loss equals unpacked
@functools.cache
def tiny_model(family: str, attn: str):
    cfg = ModelConfig(family=family, num_layers=2, hidden_size=32, num_heads=4,
                      num_kv_heads=2 if family != "gpt2" else None, intermediate_size=64,
                      max_position_embeddings=64, attn_implementation=attn)  # type: ignore[arg-type]
    return build_model(cfg, VOCAB, SPECIAL, seed=1).eval()  # fp32; eval: no dropout


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@settings(max_examples=8)
@given(lengths=st.lists(st.integers(1, SEQ_LEN), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_packed_loss_equals_the_examples_run_one_at_a_time(family, attn, lengths, seed):
    """The issue's check: the summed loss of a packed batch (through the sft objective, as training runs it) is the
    sum of each example's loss run alone and unpadded; so are the gradients."""
    model = tiny_model(family, attn)
    examples = examples_of(lengths, seed)
    columns, _ = packed(examples, SEQ_LEN)
    inputs, targets = objectives.prepare_batch("sft", {k: v.astype(np.int64) for k, v in columns.items()},
                                               special=SPECIAL, vocab_size=VOCAB)
    assert set(inputs) == {"input_ids", "position_ids"}
    model.zero_grad()
    got = objectives.loss_sum(model(**inputs).logits, targets)
    got.backward()
    got_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    want = torch.zeros(())
    scored = 0
    for ids, labels in examples:
        alone = objectives.shift_left(torch.tensor([labels]))
        want = want + objectives.loss_sum(model(input_ids=torch.tensor([ids])).logits, alone)
        scored += objectives.count_targets(alone)
    want.backward()
    want_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    assert objectives.count_targets(targets) == scored
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (float(got), float(want))
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_padded_rows_keep_the_attention_mask():
    batch = {"input_ids": np.array([[5, 6, 1]]), "labels": np.array([[-100, 6, -100]]),
             "attention_mask": np.array([[1, 1, 0]])}
    inputs, targets = objectives.prepare_batch("sft", batch, special=SPECIAL, vocab_size=VOCAB)
    assert set(inputs) == {"input_ids", "attention_mask"} and targets.tolist() == [[6, -100, -100]]


def test_a_boundary_target_is_dropped_even_when_the_data_labels_it():
    """The last token of one example never predicts the next example's first token."""
    batch = {"input_ids": np.array([[5, 6, 7, 8]]), "labels": np.array([[5, 6, 7, 8]]),
             "attention_mask": np.array([[1, 1, 1, 1]]), "position_ids": np.array([[0, 1, 0, 1]])}
    _, targets = objectives.prepare_batch("sft", batch, special=SPECIAL, vocab_size=VOCAB)
    assert targets.tolist() == [[6, -100, 8, -100]]


# ------------------------------------------------------------------------------------ the data stage, reader, eval
def _build(tmp_path, records: list[dict], *overrides: str):
    """The stage in process over one JSONL file of `records`, into tmp_path/store (one train shard)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    preset = [o for o in overrides if o.startswith("data=")]
    cfg = compose("data", ["debug=smoke", *preset, "data.val_fraction=0", "data.num_shards=1",
                           *[o for o in overrides if o not in preset]])
    data_cfg = dataclasses.replace(cfg.data, sources=[str(corpus)])
    return pipeline.build_dataset(data_cfg, cfg.tokenizer, str(tmp_path / "store"), progress=False,
                                  executor=pipeline.in_process)


def _examples(uri: str, packed_rows: bool) -> list[tuple[list[int], list[int]]]:
    """The dataset's examples, unpacked (labels from the second token: the first is never scored)."""
    table = pq.read_table(f"{uri}/train/part-00000.parquet").to_pydict()
    out = []
    for r, mask in enumerate(table["attention_mask"]):
        places = table["example_ids"][r] if packed_rows else mask
        for place in sorted(set(places) - {0}):
            at = [i for i, p in enumerate(places) if p == place]
            out.append((tuple(table["input_ids"][r][i] for i in at), tuple(table["labels"][r][i] for i in at[1:])))
    return sorted(out)


WORDS = "the keeper of the lighthouse watched the grey sea all night long and wrote down every ship".split()


@pytest.mark.parametrize("kind", ["sft", "chat"])
def test_the_stage_packs_what_it_would_pad_and_counts_it(tmp_path, kind):
    rng = np.random.default_rng(3)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)) + f" {rng.integers(10**6)}"

    records = []
    for i in range(40):
        prompt, answer = text(int(rng.integers(1, 12))), text(int(rng.integers(1, 20)))
        if i % 13 == 0:
            prompt = text(120)  # too long: skipped (sft) or truncated/skipped (chat), as when padded
        records.append({"prompt": prompt, "response": answer} if kind == "sft" else
                       {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    common = [f"data={kind}", "data.seq_len=96"]
    padded = _build(tmp_path, records, *common, "data.pack_supervised=false")
    result = _build(tmp_path, records, *common)
    assert result.uri != padded.uri and not result.reused  # a padded dataset is never reused as a packed one
    assert _examples(result.uri, True) == _examples(padded.uri, False)
    m, p = result.manifest["splits"]["train"], padded.manifest["splits"]["train"]
    assert "packing" not in p and m["packing"]["examples"] == p["num_records"]
    assert m["packing"]["rows"] == m["num_records"] < p["num_records"]
    assert m["packing"]["fill_rate"] == m["packing"]["tokens"] / (m["num_records"] * 96)
    for key in ("documents", "tokens_in", "skipped_prompt_too_long", "chat"):
        assert m[key] == p[key], key
    assert m["skipped_prompt_too_long"] + sum(m["chat"].values()) > 0  # the long ones were counted, as before

    # Training reads the packed columns, and an old padded dataset without them.
    for uri, has in ((result.uri, True), (padded.uri, False)):
        info = open_dataset(uri)
        files = SplitFiles(info.files["train"], list(objectives.get("sft").columns))
        rows = files.read(files.blocks(1)[0])
        assert ("position_ids" in rows) == has and rows["input_ids"].shape[1] == 96


def test_fingerprint_changes_only_where_it_packs():
    """Padded sft/chat and every other kind keep the fingerprints they had before `data.pack_supervised` existed."""
    inputs = [{"uri": "a.jsonl", "size": 1, "marker": "x", "format": "jsonl"}]
    cfg = compose("data", ["debug=smoke"])
    old = dataclasses.asdict(cfg.data)
    for kind, changes in (("sft", True), ("chat", True), ("pretrain", False), ("seq2seq", False)):
        on, off = (pipeline.fingerprint(dataclasses.replace(cfg.data, kind=kind, pack_supervised=v), cfg.tokenizer,
                                        inputs) for v in (True, False))
        assert (on != off) == changes, kind
    assert old["pack_supervised"] is True  # the schema's default: new sft/chat datasets are packed


def test_perplexity_over_packed_rows_equals_padded_rows():
    """The eval stage scores each packed example as if alone, also for a model loaded with its KV cache on (an
    exported model's config), which would otherwise lose the per-example mask."""
    model = build_model(ModelConfig(family="llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_position_embeddings=64), VOCAB, SPECIAL, seed=2).eval()
    model.config.use_cache = True
    examples = examples_of([5, 30, 9, 17, 2, 40, 11], seed=4)
    columns, _ = packed(examples, SEQ_LEN)
    padded = {"input_ids": [], "labels": [], "attention_mask": []}
    for ids, labels in examples:
        n = SEQ_LEN - len(ids)
        padded["input_ids"].append(ids + [SPECIAL["pad"]] * n)
        padded["labels"].append([-100] + labels[1:] + [-100] * n)
        padded["attention_mask"].append([1] * len(ids) + [0] * n)
    got = perplexity.direct_perplexity(model, {k: list(v) for k, v in columns.items()}, batch_size=2)
    want = perplexity.direct_perplexity(model, padded, batch_size=3)
    assert got["val/tokens"] == want["val/tokens"]
    assert got["val/loss"] == pytest.approx(want["val/loss"], rel=1e-5)
