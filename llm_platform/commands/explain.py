"""`llm-platform explain "prompt" [overrides]`: token attributions and attention maps for one prompt.

Uses the `eval` config tree: `eval.model` picks the model, `eval.explain.method` (grad_x_input or
integrated_gradients), `eval.explain.ig_steps`, and `eval.explain.output_uri` where saliency.png, attention.png and
explain.html go (default `./explain/`).
"""

from __future__ import annotations

import sys

USAGE = 'usage: llm-platform explain "prompt" [eval.model=... eval.explain.method=integrated_gradients ...]'


def split_args(args: list[str]) -> tuple[str, list[str]]:
    """The prompt (the one argument that is not a `key=value` override) and the overrides."""
    prompts = [a for a in args if "=" not in a or a.startswith(("'", '"'))]
    overrides = [a for a in args if a not in prompts]
    if len(prompts) != 1:
        raise SystemExit(f"{USAGE}\nexpected exactly one prompt argument, got {len(prompts)}")
    return prompts[0], overrides


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    prompt, overrides = split_args(args)
    import logging
    import os
    import tempfile

    from llm_platform import storage
    from llm_platform.config import compose
    from llm_platform.errors import StageError
    from llm_platform.evaluate import explain, scoring

    cfg = compose("eval", overrides)
    storage.configure(cfg.storage)
    out_uri = cfg.eval.explain.output_uri or os.path.join(os.getcwd(), "explain")
    try:
        mv = scoring.resolve(cfg.eval.model, cfg.storage.root)
        loaded = scoring.load(mv.uri, eager_attention=True)
        ex = explain.explain(loaded, prompt, cfg.eval.explain.method, cfg.eval.explain.ig_steps)
    except StageError as e:
        logging.getLogger("llm_platform.explain").error("%s", e)
        raise SystemExit(2) from None
    with tempfile.TemporaryDirectory(prefix="llmp-explain-") as tmp:
        explain.write(ex, tmp)
        names = sorted(os.listdir(tmp))
        for name in names:
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(storage.join(out_uri, name), f.read())
    top = sorted(zip(ex.tokens, ex.scores), key=lambda t: -abs(float(t[1])))[:5]
    print(f"{mv.name}/{mv.version}: next token {ex.target!r} (log p {ex.target_logprob:.3f}); {ex.method} top tokens: "
          + ", ".join(f"{t!r} {s:+.3f}" for t, s in top))
    print(f"wrote {', '.join(names)} to {out_uri}")
