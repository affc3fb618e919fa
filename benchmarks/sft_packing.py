"""Packed vs padded supervised rows: supervised tokens (tokens that carry loss) per second of training, same model,
same `seq_len`, same examples.

    python benchmarks/sft_packing.py [--examples 256] [--seq-len 1024] [--hidden 128] [--layers 2]

The corpus is synthetic chat: conversation lengths follow a log-normal (median `--median` tokens, sigma
`--sigma`: mostly short, a long tail cut at seq_len, as real chat corpora are), each a user turn (no loss) then an
assistant turn (loss), random token ids. The rows are made by the data stage's own functions: padded, one
conversation per row (`chat.record`, `data.pack_supervised=false`), and packed (`pack.unpadded` then
`pack.pack_examples`, the default). Each layout trains a fresh copy of the same seeded Llama-layout model
(models/build.py, sdpa, fp32) through the sft objective (train/objectives.py: position_ids and the block-diagonal
mask for packed rows) with AdamW over all its rows (`--repeats` passes), `--micro-batch` rows a step. Only the
steps are timed (forward, backward, optimizer), and the two layouts' steps are interleaved in proportion, so a
shared machine's changing load favours neither. Torch threads = CPU cores. Last line:
`ratio=<packed / padded supervised tokens per second>` (goal: at least 2.5, issue #25).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

VOCAB = 512
SPECIAL = {"eos": 0, "pad": 1, "mask": 2}


def conversations(n: int, seq_len: int, median: float, sigma: float, seed: int) -> list[tuple[list[int], list[int]]]:
    """(ids, assistant mask) per conversation: the first ~40% of tokens the user's, the rest the assistant's."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 8, seq_len).astype(int)
    out = []
    for length in lengths.tolist():
        user = max(1, int(0.4 * length))
        out.append((rng.integers(3, VOCAB, length).tolist(), [0] * user + [1] * (length - user)))
    return out


def layouts(convs, seq_len: int) -> dict[str, dict[str, np.ndarray]]:
    from llm_platform.data import chat, pack

    records: dict[str, list[np.ndarray]] = {}
    for ids, mask in convs:
        row = chat.record(ids, mask, seq_len, SPECIAL["pad"], "truncate")
        assert not isinstance(row, str)
        for key, value in row.items():
            records.setdefault(key, []).append(value)
    padded = {k: np.stack(v).astype(np.int64) for k, v in records.items()}
    flat = pack.unpadded(records)
    packed, _ = pack.pack_examples(flat["tokens"], flat["labels"], flat["length"], seq_len=seq_len,
                                   pad_id=SPECIAL["pad"])
    return {"padded": padded, "packed": {k: v.astype(np.int64) for k, v in packed.items()}}


class Run:
    """One layout's training: a fresh copy of the same seeded model, AdamW, its micro-batches in order."""

    def __init__(self, rows: dict[str, np.ndarray], args):
        from llm_platform.config.model import ModelConfig
        from llm_platform.models.build import build_model
        from llm_platform.train.objectives import count_targets, prepare_batch

        heads = max(1, args.hidden // 32)
        cfg = ModelConfig(family="llama", num_layers=args.layers, hidden_size=args.hidden, num_heads=heads,
                          num_kv_heads=max(1, heads // 2), intermediate_size=4 * args.hidden,
                          max_position_embeddings=args.seq_len)
        self.model = build_model(cfg, VOCAB, SPECIAL, seed=0).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        n = len(rows["input_ids"])
        self.batches = [prepare_batch("sft", {k: v[i:i + args.micro_batch] for k, v in rows.items()},
                                      special=SPECIAL, vocab_size=VOCAB) for i in range(0, n, args.micro_batch)]
        self.supervised = sum(count_targets(t) for _, t in self.batches)
        self.done, self.seconds = 0, 0.0

    def step(self) -> None:
        """One timed optimizer step on the next micro-batch (the model's forward and backward, AdamW)."""
        from llm_platform.train.objectives import count_targets, loss_sum

        inputs, targets = self.batches[self.done % len(self.batches)]
        start = time.perf_counter()
        loss = loss_sum(self.model(**inputs).logits, targets) / max(1, count_targets(targets))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - start
        self.done += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--median", type=float, default=150.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="passes over each layout's rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    convs = conversations(args.examples, args.seq_len, args.median, args.sigma, args.seed)
    data = layouts(convs, args.seq_len)
    runs = {name: Run(data[name], args) for name in ("padded", "packed")}
    for run in runs.values():  # untimed warm-up step each (allocator, thread pool), then fresh counters
        run.step()
        run.done, run.seconds = 0, 0.0
    # Steps interleaved in proportion (always the layout further behind), so load that drifts on a shared machine
    # weighs on both alike.
    total = {name: args.repeats * len(run.batches) for name, run in runs.items()}
    while any(run.done < total[name] for name, run in runs.items()):
        name = min(runs, key=lambda n: runs[n].done / total[n])
        runs[name].step()
    seconds = {name: run.seconds / args.repeats for name, run in runs.items()}
    supervised = {name: run.supervised for name, run in runs.items()}
    assert supervised["padded"] == supervised["packed"], supervised  # the same examples, the same loss tokens
    lengths = [len(ids) for ids, _ in convs]
    print(f"{args.examples} chat examples, lengths median {np.median(lengths):.0f} / mean {np.mean(lengths):.0f} / "
          f"max {max(lengths)} tokens; seq_len {args.seq_len}; Llama layout {args.layers} x {args.hidden}; "
          f"micro-batch {args.micro_batch}; {torch.get_num_threads()} torch threads; mean of {args.repeats} passes")
    print(f"{'layout':<8} {'rows':>6} {'ex/row':>7} {'fill':>6} {'seconds':>9} {'supervised tok/s':>17}")
    rates = {}
    for name in ("padded", "packed"):
        rows = len(data[name]["input_ids"])
        fill = data[name]["attention_mask"].sum() / (rows * args.seq_len)
        rates[name] = supervised[name] / seconds[name]
        print(f"{name:<8} {rows:>6} {args.examples / rows:>7.2f} {fill:>6.1%} {seconds[name]:>9.2f} "
              f"{rates[name]:>17,.0f}")
    print(f"ratio={rates['packed'] / rates['padded']:.2f}")


if __name__ == "__main__":
    main()
