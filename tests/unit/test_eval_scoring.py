"""Scoring, generation and attributions on tiny GPT-2 and T5 models built from configs (no Ray)."""

import math
import os

import numpy as np
import pytest
import torch
from fixtures import evals as fx

from llm_platform.evaluate import explain, generation, perplexity, scoring


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gpt2"))
    fx.build_gpt2(path)
    return path, scoring.load(path)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("t5"))
    fx.build_t5(path)
    return path, scoring.load(path)


def test_direct_perplexity_is_exp_of_mean_token_nll(gpt2, tmp_path):
    path, loaded = gpt2
    ds = fx.build_dataset(str(tmp_path / "ds"), loaded.tokenizer, seq_len=32, num_blocks=10)
    from llm_platform.data.dataset import open_dataset

    records = perplexity.read_records(open_dataset(ds).files["val"])
    assert len(records["input_ids"]) == 10
    got = perplexity.direct_perplexity(loaded.model, records, batch_size=3)
    # Reference: HF's own mean loss per block (31 predicted tokens each), averaged over equal-sized blocks.
    with torch.no_grad():
        losses = [loaded.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
                  for ids in records["input_ids"]]
    assert got["val/tokens"] == 10 * 31
    assert got["val/loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert got["val/perplexity"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
    # An untrained model is close to uniform over the vocabulary.
    assert 0.5 * len(loaded.tokenizer) < got["val/perplexity"] < 2 * len(loaded.tokenizer)


def test_read_records_limit_spans_shards(gpt2, tmp_path):
    _, loaded = gpt2
    ds = fx.build_dataset(str(tmp_path / "ds"), loaded.tokenizer, seq_len=16, num_blocks=10)
    from llm_platform.data.dataset import open_dataset

    assert len(perplexity.read_records(open_dataset(ds).files["val"], limit=7)["input_ids"]) == 7


def test_seq2seq_perplexity_scores_labels_only(t5):
    _, loaded = t5
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 1]])  # 1 is <|pad|>
    labels = np.array([[12, 13, -100], [14, 15, 16]])
    got = perplexity.direct_perplexity(loaded.model, {"input_ids": list(ids), "labels": list(labels),
                                                       "attention_mask": list((ids != 1).astype(int))},
                                       is_seq2seq=True, batch_size=1)
    with torch.no_grad():
        ref = [loaded.model(input_ids=torch.tensor(i[None]), attention_mask=torch.tensor((i != 1)[None].astype(int)),
                            labels=torch.tensor(lab[None])).loss.item() for i, lab in zip(ids, labels)]
    assert got["val/tokens"] == 5
    assert got["val/loss"] == pytest.approx((ref[0] * 2 + ref[1] * 3) / 5, rel=1e-5)


def test_batched_generation_equals_one_by_one(gpt2):
    _, loaded = gpt2
    prompts = ["the nurse said", "hello", "one two three four five"]
    batched = generation.generate_batch(loaded, prompts, max_new_tokens=6)
    single = [generation.generate_batch(loaded, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(o, str) and o for o in batched)
    assert not any(o.startswith(p) for o, p in zip(batched, prompts))  # the prompt is not echoed


def test_seq2seq_generation(t5):
    _, loaded = t5
    outs = generation.local_generator(loaded, 5, 2)(["the cat", "a dog ran", "hello world"])
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)


def test_text_log_likelihoods_match_sequence_nll(gpt2):
    _, loaded = gpt2
    tok = loaded.tokenizer
    text = "the cat sat on the mat."
    ll = scoring.text_log_likelihoods(loaded, [text, "a"])[0]
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    assert ll == pytest.approx(float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()), rel=1e-5)


def test_missing_model_and_missing_weights_are_named(tmp_path):
    with pytest.raises(scoring.ModelNotFoundError, match=r"eval.model='registry:nope'"):
        scoring.resolve("registry:nope", str(tmp_path))
    with pytest.raises(scoring.ModelNotFoundError, match="not found"):
        scoring.resolve(str(tmp_path / "nowhere"), str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(scoring.ModelNotFoundError, match=r"no \*.safetensors"):
        scoring.load(str(tmp_path / "m"))


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_integrated_gradients_completeness(family, gpt2, t5):
    path, _ = gpt2 if family == "gpt2" else t5
    loaded = scoring.load(path, eager_attention=True)
    ex = explain.explain(loaded, "the nurse said that she", "integrated_gradients", steps=64)
    ids = torch.tensor([loaded.tokenizer("the nurse said that she", add_special_tokens=False)["input_ids"]])
    emb = loaded.model.get_input_embeddings()(ids)
    score = explain._score_fn(loaded, ids)
    target = int(score(emb)[0].argmax())
    with torch.no_grad():
        gap = float(score(emb)[0, target] - score(explain.baseline_embeds(loaded, ids))[0, target])
    assert len(ex.scores) == ids.shape[1]
    assert float(ex.scores.sum()) == pytest.approx(gap, rel=0.05, abs=1e-3)
    assert len(ex.attentions) == 2 and ex.attentions[0].shape == (ids.shape[1], ids.shape[1])
    assert np.allclose(ex.attentions[0].sum(-1), 1.0, atol=1e-4)  # rows of attention weights sum to 1


def test_grad_x_input_files(gpt2, tmp_path):
    path, _ = gpt2
    loaded = scoring.load(path, eager_attention=True)
    ex = explain.explain(loaded, "one two three", "grad_x_input")
    assert np.abs(ex.scores).sum() > 0
    files = explain.write(ex, str(tmp_path / "x"))
    import matplotlib.image as mpimg

    for key in ("saliency", "attention"):
        img = mpimg.imread(files[key])
        assert img.ndim == 3 and img[..., :3].std() > 0.01
    page = open(files["html"]).read()
    assert page.count("<span") == len(ex.tokens) and "Attention" in page


def test_unknown_explain_method_names_the_key(gpt2):
    from llm_platform.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.explain.method"):
        explain.explain(gpt2[1], "hi", "shap")


def test_model_folder_has_only_safetensors(gpt2):
    path, _ = gpt2
    assert "model.safetensors" in os.listdir(path)
    assert not any(f.endswith(".bin") for f in os.listdir(path))
