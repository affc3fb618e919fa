"""bf16 FSDP2 (+ torch.compile) training throughput and MFU of a Llama preset on one GPU (H100/H200/A100).

    python benchmarks/gpu/train_mfu.py                       # llama-1b, seq 2048, micro-batch 8, compile on
    python benchmarks/gpu/train_mfu.py --model llama-350m --no-compile --steps 20
    python benchmarks/gpu/train_mfu.py --lora                # LoRA fine-tuning step (adapters r=16 on q/v)

Uses the platform's own pieces (model presets from conf/model, `parallelize` = AC -> compile -> FSDP2, AdamW groups)
on random tokens, so it measures the training step alone (no data loading, no Ray). One process, world size 1:
FSDP2 still wraps every block and the root, gathers and reshards, as it does on many GPUs. MFU is model FLOPs
(6N + 12 L d T per token) over the card's dense bf16 peak from llm_platform/models/flops.py. Prints a table and
ends with `ratio=<MFU>` (the goal is at least 0.45). Record results in docs/benchmarks.md with the card's name.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help="a preset in conf/model (llama-350m, llama-1b, ...)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8, help="steps excluded from timing (compile, allocator)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--lora", action="store_true",
                        help="LoRA fine-tuning (r=16 on the family's attention projections): frozen base weights "
                             "get no weight gradients, so MFU is also given at 4N FLOPs per token")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of the same code (gloo, fp32) to check the script without a GPU")
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --device cpu for a smoke run)")

    from llm_platform.config import compose
    from llm_platform.models.build import build_model, hf_config
    from llm_platform.models.flops import flops_per_token, model_size, normalize_gpu, peak_flops
    from llm_platform.train.optim import build_optimizer
    from llm_platform.train.parallelize import parallelize

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    lora = ["model.lora.enabled=true", "model.lora.rank=16", "model.lora.alpha=32"] if args.lora else []
    cfg = compose("train", [f"model={args.model}", f"data.seq_len={args.seq_len}", *lora]).model
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.seq_len)
    special = {"eos": 0, "pad": 1, "mask": 2}
    size = model_size(hf_config(cfg, args.vocab, special), cfg.family)
    fpt = flops_per_token(size, args.seq_len)
    model = build_model(cfg, args.vocab, special, seed=0)
    model = parallelize(model, parallelism="fsdp", device=device,
                        compute_dtype=torch.bfloat16 if on_gpu else torch.float32,
                        activation_checkpointing=args.ac, compile=not args.no_compile)
    optimizer = build_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), device=device, generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each

    def step() -> float:
        logits = model(input_ids=inputs).logits  # (B, T, V) in bf16
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    tokens_per_s = args.steps * args.micro_batch * args.seq_len / elapsed
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    peak = peak_flops(normalize_gpu(name)) if on_gpu else None
    mfu = tokens_per_s * fpt / peak if peak else float("nan")
    rows = [("device", name), ("table entry", normalize_gpu(name) or "unknown"),
            ("model", f"{args.model}: {size.total / 1e6:.1f} M params, {size.num_layers} layers, d={size.hidden_size}"),
            ("batch", f"{args.micro_batch} x {args.seq_len} tokens"),
            ("compile / AC", f"{not args.no_compile} / {args.ac}"),
            ("GFLOP per token", f"{fpt / 1e9:.3f}"), ("step time", f"{1000 * elapsed / args.steps:.1f} ms"),
            ("tokens/s", f"{tokens_per_s:,.0f}"),
            ("peak memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if on_gpu else "n/a"),
            ("final loss", f"{float(loss):.3f}"), ("MFU", f"{mfu:.3f}")]
    if args.lora:  # forward + input gradients only through the frozen base: about 4N, not 6N, FLOPs per token
        rows.insert(3, ("training", f"LoRA r=16, {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
                                    f"trainable parameters"))
        rows.append(("MFU at 4N + attention", f"{mfu * (fpt - 2 * size.total) / fpt:.3f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    dist.destroy_process_group()
    print(f"ratio={mfu:.3f}")


if __name__ == "__main__":
    main()
