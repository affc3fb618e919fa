"""The dataset's identity: a hash of its input files, the output-relevant config and the tokenizer, which names
its folder (`datasets/<name>/<fingerprint>/`), so a second run with the same inputs and config finds it done."""

from __future__ import annotations

from dataclasses import asdict

from llm_platform import storage
from llm_platform.config.data import DataConfig
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.data import mixture
from llm_platform.data import tokenizer as tokenizers
from llm_platform.data.filters import decontam
from llm_platform.data.manifest import FORMAT_VERSION
from llm_platform.data.pack import packs

# Knobs that change speed, not output, left out of the fingerprint; and `sources`, whose files are in it (listed in
# URI order): the same files named by other patterns, or in another order, are the same dataset.
_NOT_FINGERPRINTED = ("tokenize_batch_size", "max_records_reported", "name", "task_target_bytes", "sources",
                      "filter_examples_reported")


def fingerprint(cfg: DataConfig, tok: TokenizerConfig, inputs: list[dict], root: str | None = None,
                eval_tasks: list[decontam.TaskText] | None = None) -> str:
    """Hash of the inputs (uri, size, etag/mtime), the output-relevant config and the tokenizer config (with the
    files of a pretrained tokenizer; `root` resolves a `registry:` tokenizer path), and with decontamination on, the
    eval tasks' texts (`eval_tasks`, read here when not given)."""
    data = {k: v for k, v in asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    # Hashed only when on: every other dataset keeps the fingerprint it had before decontamination existed. The
    # tasks' names and texts are hashed, not where they were read from: a task file edited in place is another
    # dataset, the same file named by another path the same one.
    decontamination = data["filters"].pop("decontamination")
    if cfg.filters.decontamination.enabled:
        for key in ("documents_reported", "sources", "harness_include_path"):
            decontamination.pop(key)
        tasks = eval_tasks if eval_tasks is not None else decontam.read_sources(cfg.filters.decontamination)
        data["decontamination"] = {"config": decontamination,
                                   "tasks": [[name, sha] for name, _, sha in decontam.digest(tasks)]}
    # Hashed only where it packs: padded sft/chat and every other kind keep the fingerprints (and the finished
    # datasets) they had before the key existed; a packed dataset is never a padded one reused.
    if not packs_supervised(cfg):
        data.pop("pack_supervised", None)
    mixture.fingerprint_record(data, inputs)
    tok_record = tokenizers.fingerprint_record(tok, root or ".")
    listing = [(m["uri"], m["size"], m["marker"], m["format"]) for m in inputs]
    return storage.fingerprint({"v": FORMAT_VERSION, "inputs": listing, "data": data, "tokenizer": tok_record})


def packs_supervised(cfg: DataConfig) -> bool:
    """Whether this dataset's records are packed several per row (`data.pack_supervised`, sft and chat only)."""
    return packs(str(cfg.kind), cfg.pack_supervised)
