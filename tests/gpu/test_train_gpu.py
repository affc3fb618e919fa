"""bf16 FSDP2 on a real GPU: the debug Llama trains (loss falls) and the step is sharded (skipped without CUDA)."""

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_fsdp2_llama_debug_learns_a_fixed_batch():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from llm_platform.config.model import ModelConfig
    from llm_platform.models.build import build_model
    from llm_platform.train.objectives import loss_sum, shift_left
    from llm_platform.train.optim import build_optimizer
    from llm_platform.train.parallelize import parallelize

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    device = torch.device("cuda", 0)
    model = build_model(ModelConfig(family="llama", hidden_size=64, num_kv_heads=2), 512,
                        {"eos": 0, "pad": 1, "mask": 2}, seed=0)
    model = parallelize(model, parallelism="fsdp", device=device, compute_dtype=torch.bfloat16)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = build_optimizer(model, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))
    ids = torch.randint(0, 512, (4, 64), device=device)
    targets = shift_left(ids)
    losses = []
    for _ in range(20):
        logits = model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        loss = loss_sum(logits, targets) / (targets != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    dist.destroy_process_group()
