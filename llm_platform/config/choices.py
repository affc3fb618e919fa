"""Config keys that take one of a fixed set of values, as Enums: OmegaConf refuses any other value at compose time
with the key and the allowed values named (`train.parallelism.strategy=fdsp` fails before anything runs), so no stage
repeats a hand-written "choose one of" check.

Members compare, hash, print and serialize as their strings (`train.parallelism.strategy == "fsdp"`, JSON records,
fingerprints), because each member's name is its value.
"""

from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    """A str-valued Enum whose members behave as their value (`str`, `format`, `==`, hashing, JSON)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)


class Objective(Choice):
    clm = "clm"
    sft = "sft"
    seq2seq = "seq2seq"
    mlm = "mlm"
    dpo = "dpo"


class Schedule(Choice):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class OnNonfinite(Choice):
    stop = "stop"
    skip = "skip"


class Parallelism(Choice):
    fsdp = "fsdp"
    ddp = "ddp"
    none = "none"


class MixedPrecision(Choice):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class Placement(Choice):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


class TuneScheduler(Choice):
    asha = "asha"
    pbt = "pbt"
    fifo = "fifo"


class TuneSearch(Choice):
    random = "random"  # grid axes of the space are crossed with the random samples
    optuna = "optuna"


class SourceFormat(Choice):
    auto = "auto"
    jsonl = "jsonl"
    json = "json"
    parquet = "parquet"
    text = "text"
    hf = "hf"


class TextUnit(Choice):
    file = "file"
    paragraph = "paragraph"
    line = "line"


class DatasetKind(Choice):
    pretrain = "pretrain"
    sft = "sft"
    chat = "chat"
    seq2seq = "seq2seq"
    preference = "preference"


class PreferenceLoss(Choice):
    sigmoid = "sigmoid"  # DPO (with label_smoothing: conservative DPO)
    ipo = "ipo"


class ChatOverflow(Choice):
    truncate = "truncate"
    skip = "skip"


class OnError(Choice):
    skip = "skip"
    fail = "fail"


class TokenizerKind(Choice):
    bpe = "bpe"
    pretrained = "pretrained"


class LoraExport(Choice):
    merged = "merged"
    adapter = "adapter"


class AttnImplementation(Choice):
    sdpa = "sdpa"
    eager = "eager"


class Ingress(Choice):
    proxy = "proxy"
    direct = "direct"


class ServeBackend(Choice):
    builtin = "builtin"
    vllm = "vllm"


class WeightDtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Mode(Choice):
    min = "min"
    max = "max"


class ExplainMethod(Choice):
    grad_x_input = "grad_x_input"
    integrated_gradients = "integrated_gradients"


class Stage(Choice):
    """A stage of `llm-platform run`, in `run.stages`, `--from` and `--until`; `tune` names the train stage run as a
    sweep (`run.use_tune`)."""

    data = "data"
    train = "train"
    tune = "tune"
    register = "register"
    eval = "eval"
    promote = "promote"
    serve = "serve"
