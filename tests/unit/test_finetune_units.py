"""Fine-tuning released checkpoints, without Ray: chat records and their loss masks, the model's own tokenizer
left unaltered, tokenizer hash checks, pretrained loads (padded/unpadded vocab, added tokens, dtype), the family
table, the planner on a pretrained config, and the export that changes only the weights."""

import json
import random

import numpy as np
import pytest
import torch
from fixtures.checkpoints import LLAMA3_TEMPLATE, conversation, gpt2_checkpoint, llama3_checkpoint, tokenizer_files

from llm_platform.config.model import LoraConfig, ModelConfig
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.data import chat
from llm_platform.data import tokenizer as tokenizers
from llm_platform.data.dataset import load_tokenizer
from llm_platform.errors import ConfigError

NAMES = {"messages": "messages", "instruction": "instruction", "input": "input", "output": "output",
         "prompt": "prompt", "response": "response"}
SPECIAL = {"eos": 0, "pad": 1, "mask": 2}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return gpt2_checkpoint(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return llama3_checkpoint(tmp_path_factory.mktemp("llama3"))


# ------------------------------------------------------------------------------------------ records and masks
def test_the_three_record_shapes_become_messages():
    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a"}]
    assert chat.parse_record({"messages": convo}, NAMES) == (convo, None)
    assert chat.parse_record({"instruction": "do", "input": "this", "output": "done"}, NAMES)[0] == [
        {"role": "user", "content": "do\n\nthis"}, {"role": "assistant", "content": "done"}]
    assert chat.parse_record({"prompt": "q", "response": "a"}, NAMES)[0] == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "empty_assistant"),
    ({"messages": [{"role": "user", "content": "x"}]}, "missing_assistant"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "wrong_type"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "missing_field"),
    ({"messages": "hello"}, "malformed_messages"),
    ({"instruction": "x"}, "missing_field"),
    ({"prompt": "x", "response": 1}, "wrong_type"),
    ({"text": "x"}, "missing_field"),
])
def test_bad_records_are_named_by_reason(record, reason):
    messages, error = chat.parse_record(record, NAMES)
    assert messages is None and error.split(":")[0] == reason, error


def _assistant_text(tok, ids, mask):
    return tok.decode([t for t, m in zip(ids, mask) if m])


def test_default_template_masks_exactly_the_assistant_turns_and_ends_with_eos(gpt2):
    tok = load_tokenizer(str(gpt2))
    assert not tok.chat_template  # GPT-2 has none: the documented default (serving's fallback) renders it
    messages = conversation(random.Random(5))
    ids, mask = chat.render(tok, messages)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert _assistant_text(tok, ids, mask) == "".join(f" {a}\n" for a in answers) + tok.eos_token
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1
    # Everything else is prompt: the rendered text up to each answer, exactly as serving renders it.
    prompt = tok.apply_chat_template(messages[:-1], chat_template=chat.DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                     add_generation_prompt=True)
    first_masked = mask.index(1, len(tok(prompt, add_special_tokens=False)["input_ids"]) - 1)
    assert tok.decode(ids[:first_masked]) == prompt


def test_own_template_by_prefixes_equals_the_generation_marker_mask(llama3):
    tok = load_tokenizer(str(llama3))
    messages = conversation(random.Random(7))
    ids, mask = chat.render(tok, messages)  # Llama 3's template has no {% generation %}: prefix rendering
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert _assistant_text(tok, ids, mask) == "".join(a + "<|eot_id|>" for a in answers)
    assert tok.decode(ids).startswith("<|begin_of_text|>") and ids.count(tok.eos_token_id) == len(messages)
    # The same template with {% generation %} markers goes through transformers' assistant mask: same result.
    marked = LLAMA3_TEMPLATE.replace(
        "{{ '<|start_header_id|>' + message['role']",
        "{% if message['role'] == 'assistant' %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
        "{{ '<|start_header_id|>' + message['role']").replace("{% endfor %}", "{% endif %}{% endfor %}")
    tok.chat_template = marked
    assert chat.render(tok, messages) == (ids, mask)


def test_long_conversations_are_truncated_or_skipped_and_counted(gpt2):
    tok = load_tokenizer(str(gpt2))
    messages = conversation(random.Random(1))
    ids, mask = chat.render(tok, messages)
    first = mask.index(1)
    row = chat.record(ids, mask, first + 2, 0, "truncate")
    assert row["attention_mask"].sum() == first + 2 and (row["labels"] != -100).sum() == 2
    assert chat.record(ids, mask, first + 2, 0, "skip") == "too_long"
    assert chat.record(ids, mask, first, 0, "truncate") == "too_long"  # no assistant token would be left
    padded = chat.record(ids, mask, len(ids) + 3, 7, "skip")
    assert list(padded["input_ids"][-3:]) == [7, 7, 7] and list(padded["labels"][-3:]) == [-100] * 3
    rendered = chat.pack_chats(tok, [json.dumps(messages)] * 2, seq_len=first + 2, pad_id=0, overflow="truncate")
    assert rendered.counts["truncated"] == 2 and len(rendered.columns["input_ids"]) == 2
    assert rendered.lengths == [len(ids)] * 2


# ------------------------------------------------------------------------------------------------- tokenizers
def test_the_models_tokenizer_is_copied_unaltered(gpt2, tmp_path):
    tok, source, added = tokenizers.load_pretrained(TokenizerConfig(kind="pretrained", path=str(gpt2)), ".")
    assert added == [] and tok.pad_token is None and tok.mask_token is None  # nothing added behind the user's back
    sha = tokenizers.save(tok, str(tmp_path / "tok"), copy_from=source)
    assert tokenizer_files(tmp_path / "tok") == tokenizer_files(gpt2)
    record = tokenizers.describe(tok, sha, source=source, base_sha256=sha, base_vocab_size=len(tok))
    assert record["vocab_size"] == 350 and record["pad_token_id"] == tok.eos_token_id  # pads with EOS
    assert record["mask_token_id"] is None


def test_tokens_are_added_only_when_asked(llama3):
    cfg = TokenizerConfig(kind="pretrained", path=str(llama3), special_tokens=["<|tool|>", "<|eot_id|>"])
    tok, _, added = tokenizers.load_pretrained(cfg, ".")
    assert added == ["<|tool|>"] and len(tok) == 357


def test_a_tokenizer_path_without_model_pretrained_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained"):
        tokenizers.source_uri(TokenizerConfig(kind="pretrained", path=None), str(tmp_path))


# ------------------------------------------------------------------------------------------- pretrained loads
def test_unpadded_and_padded_vocabularies_load(gpt2, llama3):
    from llm_platform.models.build import build_model

    g = build_model(ModelConfig(pretrained=str(gpt2)), 350, SPECIAL, pretrained_dir=str(gpt2))
    assert g.config.vocab_size == 350 and type(g).__name__ == "GPT2LMHeadModel"
    m = build_model(ModelConfig(pretrained=str(llama3)), 356, SPECIAL, pretrained_dir=str(llama3))
    assert m.config.vocab_size == 448 and not m.config.tie_word_embeddings and m.config.num_key_value_heads == 2
    assert all(p.dtype == torch.float32 for p in m.parameters())  # trained weights: fp32 master copy


def test_added_tokens_get_rows_at_the_mean(gpt2, llama3):
    from llm_platform.models.build import build_model

    g = build_model(ModelConfig(pretrained=str(gpt2)), 352, SPECIAL, pretrained_dir=str(gpt2), base_vocab_size=350)
    emb = g.get_input_embeddings().weight
    assert emb.shape[0] == 352 and torch.allclose(emb[350], emb[:350].mean(0)) and torch.equal(emb[350], emb[351])
    # Llama 3 layout: the padded rows already exist; the added id's input and (untied) output rows are set.
    m = build_model(ModelConfig(pretrained=str(llama3)), 357, SPECIAL, pretrained_dir=str(llama3),
                    base_vocab_size=356)
    assert m.config.vocab_size == 448
    for w in (m.get_input_embeddings().weight, m.get_output_embeddings().weight):
        assert torch.allclose(w[356], w[:356].mean(0))


def test_lora_base_stays_in_the_compute_dtype(llama3):
    from llm_platform.models.build import build_model

    cfg = ModelConfig(pretrained=str(llama3), lora=LoraConfig(enabled=True, rank=4))
    model = build_model(cfg, 356, SPECIAL, pretrained_dir=str(llama3), dtype=torch.bfloat16)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("q_proj" in n or "v_proj" in n for n in names)  # the family's default targets


@pytest.mark.parametrize("layout", ["gpt2", "llama3"])
def test_our_loss_equals_the_hf_models_own_loss(layout, gpt2, llama3):
    from llm_platform.models.build import build_model
    from llm_platform.train.objectives import count_targets, loss_sum, prepare_batch

    folder = {"gpt2": gpt2, "llama3": llama3}[layout]
    tok = load_tokenizer(str(folder))
    rng = random.Random(0)
    rows = [chat.record(*chat.render(tok, conversation(rng)), 64, tok.eos_token_id, "truncate") for _ in range(4)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    model = build_model(ModelConfig(pretrained=str(folder)), len(tok), SPECIAL, pretrained_dir=str(folder)).eval()
    inputs, targets = prepare_batch("sft", batch, special=SPECIAL, vocab_size=len(tok))
    with torch.no_grad():
        ours = loss_sum(model(**inputs).logits, targets) / count_targets(targets)
        theirs = model(**inputs, labels=torch.as_tensor(batch["labels"], dtype=torch.long)).loss
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)


# -------------------------------------------------------------------------------- families, planner, export
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "t5", "bert"])
def test_every_family_builds_and_its_blocks_are_found(family):
    from llm_platform.models import families
    from llm_platform.models.build import build_model, transformer_blocks
    from llm_platform.models.flops import model_size

    kv = 2 if family in ("llama", "mistral", "qwen2") else None
    cfg = ModelConfig(family=family, hidden_size=32, num_kv_heads=kv)
    model = build_model(cfg, 300, SPECIAL)
    blocks = 4 if family == "t5" else 2
    assert len(transformer_blocks(model)) == blocks
    assert model_size(model.config, family).num_layers == blocks
    assert families.of_model(model).name == family
    lora = build_model(ModelConfig(family=family, hidden_size=32, lora=LoraConfig(enabled=True, rank=2)), 300, SPECIAL)
    assert any(p.requires_grad for p in lora.parameters()) and len(transformer_blocks(lora)) == blocks


def test_a_checkpoint_of_an_unknown_family_is_refused(tmp_path):
    from llm_platform.models.build import resolve_family

    with pytest.raises(ConfigError, match="model_type='rwkv'.*families.py"):
        resolve_family(ModelConfig(pretrained="x"), {"model_type": "rwkv"})


def test_the_planner_reads_the_pretrained_config(llama3):
    from llm_platform.config.train import PlanConfig, ScalingConfig, TrainConfig
    from llm_platform.models.build import count_parameters
    from llm_platform.train.plan import make_plan

    plan = make_plan(ModelConfig(pretrained=str(llama3)), TrainConfig(), ScalingConfig(num_workers=1),
                     PlanConfig(gpu_type="NVIDIA A10G"), seq_len=128, vocab_size=2048)
    from transformers import AutoModelForCausalLM

    expected = count_parameters(AutoModelForCausalLM.from_pretrained(str(llama3)))[0]
    assert plan.parameters == expected and plan.gpu_type == "A10G" and plan.fits  # not the debug GPT-2 preset


@pytest.mark.parametrize("lora", [False, True])
def test_the_export_changes_only_the_weights(gpt2, llama3, tmp_path, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_platform.models.build import build_model
    from llm_platform.train.checkpoint import export_hf

    folder = llama3 if lora else gpt2
    cfg = ModelConfig(pretrained=str(folder), lora=LoraConfig(enabled=lora, rank=4))
    model = build_model(cfg, 356 if lora else 350, SPECIAL, pretrained_dir=str(folder))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    out = tmp_path / "export"
    export_hf(model, str(folder), str(out), {"kind": "run"}, base_dir=str(folder))
    for name in ("config.json", "generation_config.json", *tokenizer_files(folder)):
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(folder))
    assert loaded.dtype == base.dtype
    assert len(AutoTokenizer.from_pretrained(str(out))) == len(load_tokenizer(str(folder)))
    changed = [n for n, p in loaded.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed  # only the weights differ
    if lora:
        adapter = tmp_path / "adapter"
        export_hf(model, str(folder), str(adapter), {"kind": "run"}, base_dir=str(folder), adapter=True)
        assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
        assert (adapter / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_a_dataset_from_another_tokenizer_is_refused_naming_both(gpt2, tmp_path):
    from fixtures.training import make_dataset

    from llm_platform.config.train import ScalingConfig, TrainConfig
    from llm_platform.train.checks import preflight

    # A BPE trained on the corpus (the old default) with the GPT-2 checkpoint's exact vocab size: same size,
    # other ids. Sizes alone would have let it through.
    dataset = make_dataset(str(tmp_path), "sft", seq_len=32, vocab_size=350)
    with pytest.raises(ConfigError, match=r"tokenized with tokenizer.kind=\? .*sha256 [0-9a-f]{12}.*"
                                          rf"model.pretrained='{gpt2}' has its own tokenizer, sha256 [0-9a-f]{{12}}"):
        preflight(ModelConfig(pretrained=str(gpt2)), TrainConfig(objective="sft"), ScalingConfig(), dataset,
                  str(tmp_path))


def test_the_default_template_renders_as_servings_fallback(gpt2):
    from llm_platform.serve.api import DEFAULT_CHAT_TEMPLATE as SERVING

    tok = load_tokenizer(str(gpt2))
    messages = conversation(random.Random(2))
    for prompt in (False, True):
        ours = tok.apply_chat_template(messages, chat_template=chat.DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                       add_generation_prompt=prompt)
        assert ours == tok.apply_chat_template(messages, chat_template=SERVING, tokenize=False,
                                               add_generation_prompt=prompt)


def test_chat_files_are_read_with_bad_records_named_by_line(tmp_path):
    from fixtures.checkpoints import write_chats

    from llm_platform.config.data import DataConfig
    from llm_platform.data import sources

    path = tmp_path / "chats.jsonl"
    bad = write_chats(path, n=16)
    (inputs, _) = sources.list_inputs([str(path)])
    spec = sources.ReadSpec.from_config(DataConfig(kind="chat"))
    records = list(sources.read_file(inputs[0], 0, spec))
    dropped = {r["drop_reason"]: r["line"] for r in records if r["drop_reason"]}
    assert dropped == bad and len(records) == 16 + len(bad)
    kept = [r for r in records if not r["drop_reason"]]
    assert all(json.loads(r["messages"])[-1]["role"] == "assistant" for r in kept)  # nothing else lost
    alpaca = json.loads(kept[3]["messages"])  # the fixture's 4th record is Alpaca-shaped
    assert [m["role"] for m in alpaca] == ["user", "assistant"] and alpaca[0]["content"].startswith("What color")
