"""The scaling switches on a real GPU (skipped without CUDA): one process, world size 1 over NCCL, so FSDP2 still
wraps, gathers and reshards every block as it does on many GPUs.

Each switch trains a small Llama for a few steps on two fixed batches of random tokens: its losses stay within
bf16's tolerance of a plain fp32 run (TF32 off), and resuming from its own step-3 DCP checkpoint
(train/checkpoint.py) continues with the uninterrupted run's losses. Each prints `switch=<name> tokens_per_s=<n>`
(over the steps after the first two, which compile and warm the allocator); benchmarks/gpu/run.sh collects these
lines. Nothing asserts a speed.

The Ray Train path of the same switches runs on CPU workers in tests/integration/test_train_switches.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

VOCAB, BATCH, SEQ_LEN, STEPS, SAVE_AT = 2048, 8, 256, 6, 3
# switch -> (strategy, compute dtype, parallelize switches, relative tolerance against the fp32 run)
SWITCHES = {
    "bf16_fsdp": ("fsdp", torch.bfloat16, {}, 5e-2),
    "activation_checkpointing": ("fsdp", torch.bfloat16, {"activation_checkpointing": True}, 5e-2),
    "compile": ("fsdp", torch.bfloat16, {"compile": True}, 5e-2),
    "cpu_offload": ("fsdp", torch.bfloat16, {"cpu_offload": True}, 5e-2),
    "bf16_ddp_autocast": ("ddp", torch.bfloat16, {}, 5e-2),
    # What conf/experiment/llama-1b-h100.yaml runs: checkpointing, then compile, then FSDP2 in bf16.
    "checkpointing_compile_fsdp": ("fsdp", torch.bfloat16, {"activation_checkpointing": True, "compile": True}, 5e-2),
}


def model_config():
    from llm_platform.config.model import ModelConfig

    return ModelConfig(name="llama-switches", family="llama", num_layers=4, num_heads=8, num_kv_heads=4,
                       hidden_size=256, max_position_embeddings=SEQ_LEN)


def batches(device: torch.device) -> list[torch.Tensor]:
    """The same token rows for every run, one (BATCH, SEQ_LEN) batch per step: two random batches in turn, so the
    loss falls (memorising them) and a resumed run must have kept its weights and optimizer state to match."""
    gen = torch.Generator().manual_seed(0)
    pair = [torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=gen).to(device) for _ in range(2)]
    return [pair[step % 2] for step in range(STEPS)]


def build(strategy: str, dtype: torch.dtype, switches: dict, device: torch.device):
    from llm_platform.models.build import build_model
    from llm_platform.train.optim import build_optimizer
    from llm_platform.train.parallelize import needs_autocast, parallelize

    model = build_model(model_config(), VOCAB, {"eos": 0, "pad": 1, "mask": 2}, seed=0)
    model = parallelize(model, parallelism=strategy, device=device, compute_dtype=dtype, **switches)
    optimizer = build_optimizer(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    autocast = (torch.autocast(device.type, dtype=dtype) if needs_autocast(strategy, dtype)
                else contextlib.nullcontext())
    return model, optimizer, autocast


def train(strategy: str, dtype: torch.dtype, switches: dict, device: torch.device, *, start: int = 0,
          resume_dir: str | None = None, save_dir: str | None = None) -> tuple[list[float], float]:
    """Steps `start`..STEPS (from `resume_dir`'s checkpoint when given; saving at SAVE_AT into `save_dir`); returns
    the per-step losses and the tokens per second of the steps after the first two."""
    from llm_platform.train import checkpoint as ckpt
    from llm_platform.train.objectives import loss_sum, shift_left
    from llm_platform.train.reader import DataPosition

    model, optimizer, autocast = build(strategy, dtype, switches, device)
    if resume_dir:
        assert ckpt.load(model, optimizer, resume_dir)["step"] == start
    losses, timed_s = [], 0.0
    for step, ids in enumerate(batches(device)[start:], start=start):
        t0 = time.perf_counter()
        targets = shift_left(ids)
        with autocast:
            logits = model(input_ids=ids).logits  # (B, T, V)
            loss = loss_sum(logits, targets) / (targets != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes: the step is done
        if step >= start + 2:
            timed_s += time.perf_counter() - t0
        if save_dir and step + 1 == SAVE_AT:
            state = ckpt.TrainState(step=SAVE_AT, tokens=SAVE_AT * BATCH * SEQ_LEN,
                                    data=DataPosition(batches_in_epoch=SAVE_AT, rows_per_batch=BATCH))
            ckpt.save(model, optimizer, state, save_dir, rank=0)
    timed_steps = STEPS - start - 2
    return losses, timed_steps * BATCH * SEQ_LEN / timed_s if timed_s else float("nan")


@pytest.fixture(scope="module")
def device():
    import torch.distributed as dist

    from llm_platform.train.parallelize import process_group_backend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # NCCL, and gloo for the CPU-offloaded gradients' norm (what the launcher asks Ray Train for under cpu_offload).
    backend = process_group_backend(cpu_offload=True, use_gpu=True)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    gpu = torch.device("cuda", 0)
    torch.cuda.set_device(gpu)
    yield gpu
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fp32_losses(device):
    """The plain reference: one process, no sharding, fp32 with TF32 off."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        losses, _ = train("none", torch.float32, {}, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    assert losses[-1] < losses[0]
    return losses


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_switch_on_gpu_matches_fp32_and_resumes(switch, device, fp32_losses, tmp_path):
    strategy, dtype, switches, rtol = SWITCHES[switch]
    save_dir = str(tmp_path / "checkpoint")
    os.makedirs(save_dir)
    losses, tokens_per_s = train(strategy, dtype, switches, device, save_dir=save_dir)
    print(f"\nswitch={switch} tokens_per_s={tokens_per_s:.0f} losses={[round(v, 4) for v in losses]}")
    np.testing.assert_allclose(losses, fp32_losses, rtol=rtol, atol=0, err_msg=f"{switch} against fp32")
    resumed, _ = train(strategy, dtype, switches, device, start=SAVE_AT, resume_dir=save_dir)
    # Not bitwise: GPU kernels (the embedding's backward, split-K matmuls) add in a nondeterministic order.
    np.testing.assert_allclose(resumed, losses[SAVE_AT:], rtol=5e-3, atol=0, err_msg=f"{switch} resumed")
