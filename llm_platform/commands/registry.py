"""`llm-platform registry list|show|promote`: see model versions, their metrics and lineage; move LATEST."""

from __future__ import annotations

import argparse
import json
import sys

SHOWN_METRICS = ("val/loss", "val/perplexity", "train/loss")


def parser() -> argparse.ArgumentParser:
    # --root is accepted before or after the action; SUPPRESS keeps a subparser from resetting it to None.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS,
                        help="storage root (default: storage.root of the composed config)")
    p = argparse.ArgumentParser(prog="llm-platform registry", description=__doc__, parents=[common])
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", parents=[common], help="versions of one model (or of every model) with key metrics")
    ls.add_argument("name", nargs="?", help="model name (default: all models)")
    show = sub.add_parser("show", parents=[common], help="one version's lineage (default: the LATEST one)")
    show.add_argument("name")
    show.add_argument("version", nargs="?", help="e.g. v0002 (default: LATEST)")
    promote = sub.add_parser("promote", parents=[common], help="point LATEST at a version")
    promote.add_argument("name")
    promote.add_argument("version")
    return p


def configured_root() -> str:
    """storage.root of the composed config (defaults, `local/`, env), with its storage settings applied."""
    from llm_platform import storage
    from llm_platform.config import compose

    cfg = compose("train")
    storage.configure(cfg.storage)
    return cfg.storage.root


def list_table(root: str, name: str | None) -> str:
    from llm_platform import registry

    versions = registry.list_versions(root, name)
    if not versions:
        return f"no registered models in {root}" if not name else f"no versions of {name!r} in {root}"
    latest: dict[str, str | None] = {}
    for n in {v.name for v in versions}:
        try:
            latest[n] = registry.latest(root, n).version
        except registry.RegistryError:
            latest[n] = None
    rows = [["model", "version", "latest", *SHOWN_METRICS, "sweep/trial", "created"]]
    for v in versions:
        sweep = v.lineage.get("sweep") or {}
        rows.append([v.name, v.version, "*" if latest.get(v.name) == v.version else "",
                     *[_fmt(v.metrics.get(m)) for m in SHOWN_METRICS],
                     f"{sweep.get('name')}/{sweep.get('trial_id')}" if sweep else "-",
                     str(v.lineage.get("created_at", "-"))[:19]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def main(argv: list[str] | None = None) -> None:
    from llm_platform import registry
    from llm_platform.errors import StageError

    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    default = configured_root()  # also applies the configured S3 endpoint to an explicit --root
    root = getattr(args, "root", None) or default
    try:
        if args.action == "list":
            print(list_table(root, args.name))
        elif args.action == "show":
            mv = registry.get(root, args.name, args.version) if args.version else registry.latest(root, args.name)
            print(f"{mv.name} {mv.version}  {mv.uri}")
            print(json.dumps(mv.lineage, indent=2, default=str))
        elif args.action == "promote":
            mv = registry.promote(root, args.name, args.version)
            print(f"{mv.name}: LATEST -> {mv.version} ({mv.uri})")
    except StageError as e:
        print(f"llm-platform registry: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
