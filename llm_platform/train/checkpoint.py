"""Sharded checkpoints with torch.distributed.checkpoint (DCP), and the HF export of a finished run.

A checkpoint folder holds every rank's DCP shard files (`__<rank>_0.distcp`), DCP's `.metadata`, and
`train_state.json` (`TrainState`: step, tokens seen, data position) as plain JSON. Ray Train merges the folders
reported by all ranks into one `checkpoint_<step>/` under the run and registers it only when every rank's upload is
done, so an interrupted save never counts. The LR schedule is a pure function of the step, so it needs no state of
its own.

DCP's `.metadata` is a pickle; it is only ever read from this platform's own run folders. Exports and pretrained
models are safetensors, which hold tensors only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from llm_platform import storage
from llm_platform.train.budget import Spend
from llm_platform.train.reader import DataPosition

TRAIN_STATE = "train_state.json"
LINEAGE = "lineage.json"


@dataclasses.dataclass(frozen=True)
class TrainState:
    """A run's progress beside its shards: `train_state.json`, one flat JSON object (the same keys as ever)."""

    step: int
    """Optimizer steps done."""
    tokens: int
    """Training tokens seen (all workers)."""
    data: DataPosition
    """Where the next micro-batch comes from."""
    spend: Spend = Spend()
    """What the run had spent when the checkpoint was taken (train/budget.py)."""

    def to_json(self) -> dict[str, float | None]:
        return {"step": self.step, "tokens": self.tokens, **dataclasses.asdict(self.data), **self.spend.to_json()}

    @classmethod
    def from_json(cls, record: dict[str, Any], *, rows_per_batch: int, data_partitions: int) -> TrainState:
        """A saved state in this run's global micro-batches of `rows_per_batch` rows (see `data_position`).

        `data_partitions` is only for checkpoints older than the field: the epoch order is always the checkpoint's.
        """
        position = DataPosition(epoch=int(record["epoch"]), batches_in_epoch=data_position(record, rows_per_batch),
                                rows_per_batch=rows_per_batch,
                                data_partitions=int(record.get("data_partitions") or data_partitions))
        spend = Spend(**{f.name: float(record.get(f.name) or 0.0) for f in dataclasses.fields(Spend)})
        return cls(step=int(record["step"]), tokens=int(record["tokens"]), data=position, spend=spend)


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, directory: str,
         *, rank: int) -> None:
    """Write this rank's shards (collective: every rank calls it) and, from rank 0, the train state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)
    if rank == 0:
        with open(os.path.join(directory, TRAIN_STATE), "w") as f:
            json.dump(state.to_json(), f, indent=2, sort_keys=True)


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> dict[str, Any]:
    """Restore model and optimizer in place (collective) and return the train state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_train_state(directory)


def read_train_state(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, TRAIN_STATE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a training checkpoint: {TRAIN_STATE} is missing")
    with open(path) as f:
        return json.load(f)


def data_position(state: dict[str, Any], rows_per_batch: int) -> int:
    """A saved state's data position in this run's global micro-batches (`micro_batch_size * num_workers` rows).

    A checkpoint counts the global micro-batches it consumed, so resuming with another worker count or micro-batch
    size must convert it, or the run would re-read or skip rows (a ValueError when that cannot be done). Checkpoints
    without `rows_per_batch` used this run's size.
    """
    saved = int(state.get("rows_per_batch") or rows_per_batch)
    position = DataPosition(epoch=int(state.get("epoch", 0)), batches_in_epoch=int(state["batches_in_epoch"]),
                            rows_per_batch=saved)
    return position.rebased(rows_per_batch).batches_in_epoch


def load_model_weights(model: torch.nn.Module, directory: str) -> None:
    """Load only the model part of a checkpoint into a plain (unsharded) model, in one process (no collectives)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model_sd = get_model_state_dict(model)
    state = {"model": model_sd}
    dcp.load(state, checkpoint_id=directory, no_dist=True)
    set_model_state_dict(model, state["model"])


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".safetensors.index.json",
                   ".bin.index.json")


def export_hf(model: torch.nn.Module, tokenizer, uri: str, lineage: dict[str, Any], *, base_dir: str | None = None,
              adapter: bool = False) -> str:
    """Save an HF folder (config.json, model.safetensors, tokenizer files, lineage.json last) to `uri`.

    Args:
        model: the trained model (peft-wrapped with LoRA).
        tokenizer: the folder (URI) whose tokenizer files are copied byte for byte, or a tokenizer object to save.
        uri: where the export goes.
        lineage: the record written last.
        base_dir: the pretrained checkpoint fine-tuned, if any. Its other files (config.json,
            generation_config.json, ...) are copied unchanged when the vocabulary is unchanged, and the weights are
            saved in its dtype, so only the weights differ from the base.
        adapter: save only the peft LoRA adapter (adapter_config.json, adapter_model.safetensors) instead of a
            merged model.
    """
    from llm_platform.models.build import merge_lora

    with tempfile.TemporaryDirectory(prefix="llmp-export-") as tmp:
        base_config = _read_json(os.path.join(base_dir, "config.json")) if base_dir else {}
        if adapter:
            peft_model: Any = model  # a peft model (nn.Module's __getattr__ types save_pretrained as a Tensor)
            peft_model.save_pretrained(tmp)
        else:
            plain = merge_lora(model)
            dtype = base_config.get("dtype") or base_config.get("torch_dtype")
            if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
                plain.to(getattr(torch, dtype))
            # transformers 5 writes safetensors only; `use_cache` was off for training and is turned on for serving.
            plain.config.use_cache = True
            plain.save_pretrained(tmp)
            if base_dir and int(base_config.get("vocab_size", -1)) == plain.config.vocab_size:
                for name in sorted(os.listdir(base_dir)):  # the base's config files, unchanged
                    path = os.path.join(base_dir, name)
                    if os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES) and not name.startswith(".") \
                            and name != LINEAGE:
                        shutil.copyfile(path, os.path.join(tmp, name))
        if isinstance(tokenizer, str):
            from llm_platform.data.dataset import copy_tokenizer_files

            copy_tokenizer_files(tokenizer, tmp)
        else:
            tokenizer.save_pretrained(tmp)
        if not any(name.endswith(".safetensors") for name in os.listdir(tmp)):
            raise RuntimeError("export produced no .safetensors file")
        storage.delete(uri)
        storage.upload_dir(tmp, uri)
    storage.write_json(storage.join(uri, LINEAGE), lineage)  # the record, last
    return uri


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
