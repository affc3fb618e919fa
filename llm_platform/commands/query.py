"""`llm-platform query "prompt"`: send a prompt to a running endpoint with the openai client."""

from __future__ import annotations

import argparse
import os
import sys


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llm-platform query", description=__doc__)
    p.add_argument("prompt", help="text to complete (or the user message with --chat)")
    p.add_argument("--url", default=os.environ.get("LLM_PLATFORM_URL", "http://127.0.0.1:8000"),
                   help="endpoint base URL, without /v1 (env LLM_PLATFORM_URL)")
    p.add_argument("--model", default=None, help="model id (default: the first one the endpoint lists)")
    p.add_argument("--api-key-env", default="LLM_PLATFORM_API_KEYS",
                   help="env var holding the API key (the first of a comma-separated list is used)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions instead of /v1/completions")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import openai

    args = parse(sys.argv[1:] if argv is None else argv)
    key = (os.environ.get(args.api_key_env, "").split(",")[0].strip()) or "none"
    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=key, max_retries=1)
    try:
        model = args.model or client.models.list().data[0].id
        common = dict(model=model, max_tokens=args.max_tokens, temperature=args.temperature, stream=args.stream)
        if args.chat:
            resp = client.chat.completions.create(messages=[{"role": "user", "content": args.prompt}], **common)
        else:
            resp = client.completions.create(prompt=args.prompt, **common)
        if args.stream:
            for chunk in resp:
                for choice in chunk.choices:
                    print(choice.delta.content or "" if args.chat else choice.text, end="", flush=True)
            print()
        else:
            choice = resp.choices[0]
            print(choice.message.content if args.chat else choice.text)
    except openai.APIStatusError as e:
        print(f"llm-platform query: {args.url} answered {e.status_code}: {e.message}", file=sys.stderr)
        raise SystemExit(2) from None
    except openai.APIConnectionError:
        print(f"llm-platform query: cannot reach {args.url} (is `llm-platform serve` running?)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
