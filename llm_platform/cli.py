"""`llm-platform <stage> [overrides]`: dispatch to the stage's entry point.

Hydra stages (data, train, tune, serve, eval, run) keep all of Hydra's CLI: `--help`, `--cfg job`, overrides, `-m`.
Imports are lazy so that `llm-platform --help` answers at once.
"""

from __future__ import annotations

import importlib
import sys

from llm_platform.config import open_overrides

# stage -> (module with `main()`, one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "data": ("llm_platform.commands.data", "corpus URIs -> cleaned, deduplicated, tokenized, packed dataset"),
    "train": ("llm_platform.commands.train", "dataset -> trained model (Ray Train, FSDP2), sharded checkpoints"),
    "tune": ("llm_platform.commands.tune", "dataset + search space -> sweep and the winner in the registry"),
    "eval": ("llm_platform.commands.evaluate", "model version -> metrics.json and report"),
    "serve": ("llm_platform.commands.serve", "model version -> OpenAI-compatible Ray Serve endpoint"),
    "run": ("llm_platform.commands.run", "every stage in order, each skipped when its output exists"),
    "submit": ("llm_platform.commands.submit", "any stage as a Ray job on a cluster"),
    "jobs": ("llm_platform.commands.jobs", "list, follow or stop Ray jobs"),
    "registry": ("llm_platform.commands.registry", "list, show or promote model versions"),
    "query": ("llm_platform.commands.query", "send a prompt to a running endpoint"),
    "explain": ("llm_platform.commands.explain", "token attributions and attention maps for a prompt"),
    "plan": ("llm_platform.commands.plan", "parameters, FLOPs, memory, time and cost of a training config"),
    "status": ("llm_platform.commands.status", "the lineage chain of the last run"),
}


def usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = ["usage: llm-platform <stage> [-v] [hydra overrides | --help]", "", "stages:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()]
    return "\n".join(lines)


def _stage_flags(args: list[str]) -> list[str]:
    """`--from X` / `--until X` (or `--from=X`) as the overrides `run.from_stage=X` / `run.until_stage=X`."""
    out, i = [], 0
    while i < len(args):
        flag, _, value = args[i].partition("=")
        if flag in ("--from", "--until"):
            if not value:
                if i + 1 >= len(args):
                    raise SystemExit(f"llm-platform run: {flag} needs a stage name")
                value, i = args[i + 1], i + 1
            out.append(f"run.{flag[2:]}_stage={value}")
        else:
            out.append(args[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage = args[0]
    if stage not in STAGES:
        print(f"llm-platform: unknown stage {stage!r}; choose one of: {', '.join(STAGES)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    if stage == "run":
        args = [args[0], *_stage_flags(args[1:])]
    # -v / --verbose: Ray's, Ray Data's, Serve's and the workers' own lines on the console too (console.py).
    args = [("verbose=true" if a in ("-v", "--verbose") else a) for a in args]
    args = [args[0], *open_overrides(args[1:])]  # `data.mixture.<name>...=`: entries the user names
    module = importlib.import_module(STAGES[stage][0])
    # Hydra reads sys.argv; make it look like the stage was the program.
    sys.argv = [f"llm-platform {stage}", *args[1:]]
    module.main()


if __name__ == "__main__":
    main()
