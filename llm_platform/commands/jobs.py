"""`llm-platform jobs list|logs|stop`: the Ray jobs of a cluster (see `llm-platform submit`)."""

from __future__ import annotations

import argparse
import datetime
import sys

from llm_platform import jobs


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llm-platform jobs", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None,
                        help="Ray Jobs API (dashboard) URL; default RAY_API_SERVER_ADDRESS, RAY_ADDRESS or "
                             f"{jobs.DEFAULT_ADDRESS}")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", parents=[common], help="submitted jobs, newest first")
    logs = sub.add_parser("logs", parents=[common], help="a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit with its status")
    stop = sub.add_parser("stop", parents=[common], help="stop a running job")
    stop.add_argument("job_id")
    stop.add_argument("--wait", action="store_true", help="return only once the job has stopped")
    return p.parse_args(argv)


def _time(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def main(argv: list[str] | None = None) -> None:
    from llm_platform.errors import StageError

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        client = jobs.connect(args.address)
        if args.action == "list":
            rows = jobs.list_jobs(client)
            print(f"{'SUBMISSION ID':<32} {'STATUS':<10} {'STARTED':<19}  ENTRYPOINT")
            for r in rows:
                print(f"{r['submission_id']:<32} {r['status']:<10} {_time(r['start_time']):<19}  {r['entrypoint']}")
        elif args.action == "logs":
            if args.follow:
                res = jobs.follow(client, args.job_id)
                raise SystemExit(res.exit_code)
            sys.stdout.write(jobs.logs(client, args.job_id))
        elif args.action == "stop":
            was_running = jobs.stop(client, args.job_id)
            if args.wait:
                res = jobs.wait(client, args.job_id)
                print(f"{args.job_id} {res.status}")
            else:
                print(f"{args.job_id} {'stopping' if was_running else 'was not running'}")
    except StageError as e:
        print(f"llm-platform jobs: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as e:
        # The Jobs API answers an unknown id with a RuntimeError carrying the HTTP body.
        print(f"llm-platform jobs: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
