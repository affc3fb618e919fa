"""What a serving replica knows about its model: loading it (safetensors only), splitting it into base and output
head so generation projects only the last position, and its KV-cache bytes per token for the default budget."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class PositionLogits:
    """Logits of any prompt positions of a prefill, computed on demand from the hidden states (or sliced from
    logits a model computed whole)."""

    def __init__(self, hidden: torch.Tensor | None = None, head=None, logits: torch.Tensor | None = None):
        self.hidden, self.head, self.logits = hidden, head, logits

    def rows(self, row: int, start: int, end: int) -> torch.Tensor:
        """(end - start, V) logits of positions [start, end) of batch row `row`."""
        if self.logits is not None:
            return self.logits[row, start:end]
        assert self.hidden is not None and self.head is not None  # built with either logits or hidden and head
        return self.head(self.hidden[row, start:end])


def split_model(model) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(base model, output head) when the causal LM's logits are exactly the head over the base's last hidden
    state (GPT-2, Llama, Mistral, Qwen2...), checked on a few tokens; else (None, None) and the engine asks the model
    for the positions it needs (`logits_to_keep`)."""
    base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None or base is model:
        return None, None
    device = next(model.parameters()).device
    ids = torch.arange(1, 5, device=device)[None, :] % max(int(model.config.vocab_size), 2)
    try:
        with torch.no_grad():
            want = model(input_ids=ids).logits.float()
            got = head(base(input_ids=ids).last_hidden_state).float()
    except Exception:  # noqa: BLE001 - an unusual model: use its own forward
        return None, None
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
        return None, None
    return base, head


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes in every layer (keys and values, the model's dtype)."""
    cfg = model.config
    # A missing attribute reads as 0 (falsy, as None would), so the fallback name or default applies.
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 1))
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 1))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", heads))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    itemsize = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize


def default_batch_tokens(model, per_token: int, memory_fraction: float = 0.5) -> int:
    """KV-cache tokens a replica may hold: `memory_fraction` of the accelerator's free memory after the weights
    (CUDA), or of the machine's available memory (CPU), over the bytes a token takes; at least one full context."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:  # pragma: no cover - psutil comes with Ray
            free = 8 * 2**30
    context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    return max(context, int(free * memory_fraction) // max(per_token, 1))


def load_model(folder: str | Path, device: str = "cpu", dtype: str = "float32"):
    """Model and tokenizer of an HF-format folder; weights only from safetensors (never pickle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found: serve.model must be an HF-format model folder")
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors in {folder}: weights are loaded only from safetensors")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True,
                                                                  dtype=getattr(torch, dtype))
    return model.to(device).eval(), tokenizer
