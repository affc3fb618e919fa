"""Interpretability: per-token attributions for the model's next-token choice, and attention maps.

The explained quantity is log p(target | prompt) for the target the model would generate next (greedy), or a given
one. Attributions are taken on the input embeddings e (1, T, C), summed over C:
    grad_x_input          e * d score / d e
    integrated_gradients  (e - b) * mean over alpha of d score / d e at b + alpha * (e - b) (midpoint rule, `steps`
                          points), with b the embeddings of a prompt of pad tokens: the attributions sum to about
                          score(e) - score(b) (completeness). A pad baseline, not zeros, because models that
                          RMS-normalize their input (T5, Llama) are blind to the scale of e, so the straight path
                          from 0 would carry all the change in its first infinitesimal step.
Attention maps are the head-averaged attention weights per layer (encoder self-attention for seq2seq models); they
need the eager attention kernel, so load the model with `load(uri, eager_attention=True)`.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field

import numpy as np

from llm_platform.errors import ConfigError

METHODS = ("grad_x_input", "integrated_gradients")


@dataclass
class Explanation:
    """Attributions of one prompt's tokens for one target token."""

    tokens: list[str]
    scores: np.ndarray  # (T,)
    target: str
    target_logprob: float
    method: str
    attentions: list[np.ndarray] = field(default_factory=list)  # per layer (T, T), head-averaged


def _score_fn(loaded, input_ids):
    """score(embeddings (N, T, C)) -> next-token log-probs (N, V) at the last position."""
    import torch

    model = loaded.model
    start = getattr(model.config, "decoder_start_token_id", None)

    def run(embeds):
        if loaded.is_seq2seq:
            dec = torch.full((embeds.shape[0], 1), int(start if start is not None else 0), dtype=torch.long)
            logits = model(inputs_embeds=embeds, decoder_input_ids=dec).logits
        else:
            logits = model(inputs_embeds=embeds).logits
        return torch.log_softmax(logits[:, -1].float(), dim=-1)  # (N, V)

    return run


def baseline_embeds(loaded, input_ids):
    """The integrated-gradients baseline: embeddings of pad tokens at every position (1, T, C)."""
    import torch

    pad = loaded.tokenizer.pad_token_id
    return loaded.model.get_input_embeddings()(torch.full_like(input_ids, int(pad or 0))).detach()


def explain(loaded, prompt: str, method: str = "grad_x_input", steps: int = 16, target_id: int | None = None,
            with_attention: bool = True) -> Explanation:
    """Attributions of the prompt's tokens for the next token, and (optionally) attention maps."""
    import torch

    if method not in METHODS:
        raise ConfigError(f"eval.explain.method: {method!r} is not one of {', '.join(METHODS)}")
    tok = loaded.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("explain: the prompt is empty after tokenization")
    input_ids = torch.tensor([ids])  # (1, T)
    score = _score_fn(loaded, input_ids)
    with torch.enable_grad():
        embeds = loaded.model.get_input_embeddings()(input_ids).detach()  # (1, T, C)
        with torch.no_grad():
            base_logprobs = score(embeds)[0]
        target = int(base_logprobs.argmax()) if target_id is None else int(target_id)
        if method == "grad_x_input":
            e = embeds.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(score(e)[0, target], e)
            attr = (grad * embeds).sum(-1)[0]
        else:
            base = baseline_embeds(loaded, input_ids)
            alphas = (torch.arange(steps, dtype=embeds.dtype) + 0.5) / steps
            path = (base + alphas.view(-1, 1, 1) * (embeds - base)).requires_grad_(True)  # (steps, T, C)
            (grads,) = torch.autograd.grad(score(path)[:, target].sum(), path)
            attr = (grads.mean(0, keepdim=True) * (embeds - base)).sum(-1)[0]
    attentions: list[np.ndarray] = []
    if with_attention:
        with torch.no_grad():
            if loaded.is_seq2seq:
                start = int(getattr(loaded.model.config, "decoder_start_token_id", 0) or 0)
                out = loaded.model(input_ids=input_ids, decoder_input_ids=torch.tensor([[start]]),
                                   output_attentions=True)
                layers = out.encoder_attentions
            else:
                layers = loaded.model(input_ids=input_ids, output_attentions=True).attentions
        attentions = [a[0].float().mean(0).numpy() for a in (layers or []) if a is not None]  # (T, T) each
    return Explanation(tokens=[tok.decode([i]) for i in ids], scores=attr.detach().float().numpy(),
                       target=tok.decode([target]), target_logprob=float(base_logprobs[target]), method=method,
                       attentions=attentions)


def _colors(scores: np.ndarray):
    import matplotlib

    scale = float(np.max(np.abs(scores))) or 1.0
    cmap = matplotlib.colormaps["RdBu_r"]
    return [cmap(0.5 + 0.5 * s / scale) for s in scores]


def saliency_png(ex: Explanation, path: str) -> None:
    """Tokens as boxes coloured by attribution (red supports the target, blue opposes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_line = 10
    lines = max(1, (len(ex.tokens) + per_line - 1) // per_line)
    fig, ax = plt.subplots(figsize=(10, 0.6 * lines + 1.0))
    for i, (token, color) in enumerate(zip(ex.tokens, _colors(ex.scores))):
        row, col = divmod(i, per_line)
        ax.add_patch(plt.Rectangle((col, -row - 1), 0.95, 0.9, color=color))
        ax.text(col + 0.47, -row - 0.55, token.replace("\n", "\\n")[:12], ha="center", va="center", fontsize=9)
    ax.set_xlim(0, per_line)
    ax.set_ylim(-lines - 0.1, 0)
    ax.axis("off")
    ax.set_title(f"{ex.method}: attribution for next token {ex.target!r} (log p = {ex.target_logprob:.2f})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def attention_png(ex: Explanation, path: str, max_layers: int = 12) -> None:
    """One head-averaged attention heatmap per layer (rows attend to columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = ex.attentions[:max_layers]
    if not maps:
        raise ConfigError("explain: the model returned no attention weights (load it with eager attention)")
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.4), squeeze=False)
    labels = [t.strip()[:8] or "_" for t in ex.tokens]
    for layer, (ax, attn) in enumerate(zip(axes[0], maps)):
        ax.imshow(attn, cmap="viridis", vmin=0.0, vmax=max(float(attn.max()), 1e-6))
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_html(ex: Explanation, attention_image: str | None = None) -> str:
    """A standalone HTML page: coloured tokens with their scores on hover, and the last layer's attention table."""
    spans = []
    for token, score, color in zip(ex.tokens, ex.scores, _colors(ex.scores)):
        rgb = "rgb({},{},{})".format(*(int(255 * c) for c in color[:3]))
        spans.append(f'<span title="{score:+.4f}" style="background:{rgb};padding:2px;margin:1px;'
                     f'white-space:pre">{html.escape(token)}</span>')
    parts = [f"<h2>{html.escape(ex.method)}: next token <code>{html.escape(ex.target)}</code> "
             f"(log p = {ex.target_logprob:.3f})</h2>", "<p>" + "".join(spans) + "</p>"]
    if ex.attentions:
        last = ex.attentions[-1]
        head = "".join(f"<th>{html.escape(t)}</th>" for t in ex.tokens)
        rows = []
        for token, row in zip(ex.tokens, last):
            cells = "".join(f'<td title="{v:.3f}" style="background:rgba(68,1,84,{v:.3f})"></td>' for v in row)
            rows.append(f"<tr><th>{html.escape(token)}</th>{cells}</tr>")
        parts.append("<h3>Attention, last layer (head average)</h3><table><tr><th></th>" + head + "</tr>"
                     + "".join(rows) + "</table>")
    if attention_image:
        parts.append(f'<img src="{html.escape(attention_image)}" alt="attention maps">')
    style = "td{width:18px;height:18px;border:1px solid #eee}th{font-weight:normal;font-size:11px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" \
           + "".join(parts) + "</body></html>"


def write(ex: Explanation, folder: str) -> dict[str, str]:
    """Write saliency.png, attention.png (when there are maps) and explain.html into a local folder."""
    os.makedirs(folder, exist_ok=True)
    files = {"saliency": os.path.join(folder, "saliency.png")}
    saliency_png(ex, files["saliency"])
    if ex.attentions:
        files["attention"] = os.path.join(folder, "attention.png")
        attention_png(ex, files["attention"])
    files["html"] = os.path.join(folder, "explain.html")
    with open(files["html"], "w", encoding="utf-8") as f:
        f.write(to_html(ex, "attention.png" if ex.attentions else None))
    return files
