"""Fill the `${tf:<output>}` and `${image_tag}` placeholders of a manifest in this folder and print it.

    terraform -chdir=terraform output -json > /tmp/tf.json
    python cluster/render.py --outputs /tmp/tf.json --image-tag 0.1.0 cluster/ray-job.train.yaml | kubectl apply -f -

Without `--outputs` it runs `terraform -chdir=<repo>/terraform output -json` itself. A string output replaces its
placeholder in place; a list output (e.g. `private_subnet_ids`) becomes a YAML flow sequence and must stand alone as
a value. An unknown output name, or a placeholder left over, is an error naming it. Standard library only, so it
runs anywhere Terraform does.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

PLACEHOLDER = re.compile(r"\$\{(tf:[a-z0-9_]+|image_tag)\}")


def load_outputs(path: str | None) -> dict[str, object]:
    """`terraform output -json` as {name: value}."""
    if path:
        raw = json.loads(Path(path).read_text())
    else:
        tf_dir = Path(__file__).resolve().parents[1] / "terraform"
        proc = subprocess.run(["terraform", f"-chdir={tf_dir}", "output", "-json"], check=True,
                              capture_output=True, text=True)
        raw = json.loads(proc.stdout)
    # `terraform output -json` wraps each value as {"value": ..., "type": ..., "sensitive": ...}.
    return {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in raw.items()}


def render(text: str, outputs: dict[str, object], image_tag: str, source: str = "<manifest>") -> str:
    """The manifest text with every placeholder filled; raises ValueError naming an unknown one."""

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key == "image_tag":
            return image_tag
        name = key[len("tf:"):]
        if name not in outputs:
            raise ValueError(f"{source}: ${{{key}}} names no terraform output (have: {', '.join(sorted(outputs))})")
        value = outputs[name]
        if value is None:
            raise ValueError(f"{source}: terraform output {name!r} is null (is the feature that sets it enabled?)")
        return json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    return PLACEHOLDER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("manifests", nargs="+", help="files under cluster/ to render")
    parser.add_argument("--outputs", help="file with `terraform output -json` (default: run terraform)")
    parser.add_argument("--image-tag", required=True, help="tag of the runtime image pushed to image_repository_url")
    args = parser.parse_args(argv)
    outputs = load_outputs(args.outputs)
    docs = []
    for name in args.manifests:
        try:
            docs.append(render(Path(name).read_text(), outputs, args.image_tag, source=name))
        except ValueError as e:
            print(f"render: {e}", file=sys.stderr)
            return 2
    sys.stdout.write("\n---\n".join(docs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
