"""What a serving replica knows about its model: loading it (safetensors only), splitting it into base and output
head so generation projects only the last position, its KV-cache bytes per token, and the memory a replica may take
for the default KV budget (its share of the GPU; on CPU, under its cgroup's limit)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CGROUP_ROOT = "/sys/fs/cgroup"


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


def default_batch_tokens(model, per_token: int, memory_fraction: float = 0.5, device_share: float = 1.0,
                         cgroup_root: str | Path | None = None) -> int:
    """KV-cache tokens a replica may hold: `memory_fraction` of the memory this replica may still take
    (`replica_memory_bytes`) over the bytes a token takes; at least one full context."""
    memory = replica_memory_bytes(next(model.parameters()).device, device_share, cgroup_root)
    context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    return max(context, int(memory * memory_fraction) // max(per_token, 1))


def replica_memory_bytes(device: torch.device, device_share: float = 1.0, cgroup_root: str | Path | None = None
                         ) -> int:
    """Bytes this replica may still take (for its KV cache and its activations), after its weights.

    CUDA: its share of the device (`device_share`, Serve's `num_gpus` per replica: 0.5 is half the GPU) less what
    this process holds already (its weights, torch's cached blocks), and never more than is free now. Taking a part
    of what each replica saw free at its start did not work: the first of two replicas on half a GPU each took half
    of the whole GPU, the second half of the rest, and together they left nothing for activations.
    CPU: the machine's available memory, or what is left under the cgroup memory limit when that is less (in a
    container or a Kubernetes pod, psutil sees the node's memory, not the pod's limit).
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        share = device_share if 0 < device_share <= 1 else 1.0
        return max(0, min(free, int(share * total) - torch.cuda.memory_reserved(device)))
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil comes with Ray
        available = 8 * 2**30
    left = cgroup_available_bytes(cgroup_root)
    return available if left is None else min(available, left)


def cgroup_available_bytes(root: str | Path | None = None) -> int | None:
    """Memory left under this process's cgroup memory limit, or None when there is no limit (or no cgroup files).

    cgroup v2: `memory.max` - `memory.current`; v1: `memory/memory.limit_in_bytes` - `memory/memory.usage_in_bytes`.
    Usage counts page cache too (the safetensors file just read, for one), which the kernel drops before it kills
    anything: the inactive part of it (`inactive_file` in `memory.stat`, what the kubelet leaves out of a pod's
    working set too) is not counted as used.
    """
    root = Path(root or CGROUP_ROOT)
    layouts = ((root, "memory.max", "memory.current", "inactive_file"),  # v2
               (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))  # v1
    for folder, limit_name, usage_name, inactive_key in layouts:
        try:
            limit_text = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue  # not this layout (v1 and v2 side by side: v2 without the memory controller)
        if limit_text == "max" or int(limit_text) >= 1 << 60:  # v1 writes "no limit" as a huge number
            return None
        inactive = 0
        try:
            for line in (folder / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(limit_text) - (usage - min(inactive, usage)))
    return None


def load_tokenizer(folder: str | Path):
    """The tokenizer of an HF-format model folder (the service encodes prompts and renders chats with it)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found: serve.model must be an HF-format model folder")
    return AutoTokenizer.from_pretrained(folder)


def load_model(folder: str | Path, device: str = "cpu", dtype: str = "float32"):
    """Model and tokenizer of an HF-format folder; weights only from safetensors (never pickle)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tokenizer = load_tokenizer(folder)
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors in {folder}: weights are loaded only from safetensors")
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True,
                                                                  dtype=getattr(torch, dtype))
    return model.to(device).eval(), tokenizer
