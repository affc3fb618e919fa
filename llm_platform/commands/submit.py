"""`llm-platform submit <stage> [overrides] --address URL [--no-wait]`: run a stage as a Ray job on a cluster.

The job runs `llm-platform <stage> <overrides>` on the cluster with this checkout's code (or, with --installed, the
package in the cluster's image) and the storage environment (never credentials). Key files in the checkout are left
out of the upload, and one that holds a secret under another name stops it (`jobs.plan_upload`). Its logs stream
here and this command exits with the job's exit status; Ctrl-C stops following, not the job.
"""

from __future__ import annotations

import argparse
import sys

from llm_platform import jobs


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llm-platform submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=jobs.JOB_STAGES, help="the stage to run")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the stage, e.g. debug=smoke storage=s3")
    p.add_argument("--address", default=None,
                   help="Ray Jobs API (dashboard) URL; default RAY_API_SERVER_ADDRESS, RAY_ADDRESS or "
                        f"{jobs.DEFAULT_ADDRESS}")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    code = p.add_mutually_exclusive_group()
    code.add_argument("--working-dir", default=None,
                      help="folder to upload as the job's code (default: this checkout, when run from one)")
    code.add_argument("--installed", action="store_true",
                      help="upload nothing: run the llm-platform installed in the cluster's image")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the job (repeatable). Names that look like secrets (KEY, TOKEN, "
                        "SECRET, PASSWORD, CREDENTIAL...) and URLs with a password are refused: Ray logs runtime "
                        "envs; secrets come from the cluster's own environment (docs/cloud.md)")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs to reserve for the driver itself (stages reserve their workers' GPUs on their own)")
    p.add_argument("--no-check", action="store_true", help="skip composing the config locally before submitting")
    return p.parse_intermixed_args(argv)


def check_overrides(stage: str, overrides: list[str]) -> None:
    """Compose the stage's config locally so a typo fails here, naming the key, not minutes later on the cluster.

    Interpolations are not resolved (`config.compose` would resolve them): `${oc.env:LLM_PLATFORM_BUCKET}` may only
    exist on the cluster.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from llm_platform.config import conf_dir, register
    from llm_platform.errors import ConfigError

    register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            compose(config_name=stage, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra's own line names the override; its cause (OmegaConf) says what is wrong with it.
        lines = [str(err).strip().splitlines()[0] for err in (e, e.__cause__) if err is not None and str(err).strip()]
        raise ConfigError(f"{stage} config: {'; '.join(lines) or type(e).__name__}") from None
    finally:
        GlobalHydra.instance().clear()


def main(argv: list[str] | None = None) -> None:
    from llm_platform.errors import StageError

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.installed:
            working_dir = None
        else:
            working_dir = args.working_dir or jobs.project_root()
            if working_dir is None:
                print("llm-platform submit: not in a checkout; running the package installed on the cluster",
                      file=sys.stderr)
        extra_env = jobs.parse_env(args.env)
        upload = None if working_dir is None else jobs.plan_upload(working_dir)
        for rel in upload.left_out if upload else []:
            print(f"llm-platform submit: leaving {rel} out of the upload (a key file; keep keys outside the "
                  "checkout, e.g. in $HOME/.config/llm-platform/: docs/cloud.md)", file=sys.stderr)
        if not args.no_check:
            check_overrides(args.stage, args.overrides)
        client = jobs.connect(args.address)
        job_id = jobs.submit(client, args.stage, args.overrides, upload, extra_env,
                             submission_id=args.submission_id, entrypoint_num_gpus=args.num_gpus)
    except StageError as e:
        print(f"llm-platform submit: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as e:
        # The Jobs API answers a refused submission (duplicate id, bad runtime env, agent down) with HTTP 500.
        print(f"llm-platform submit: the cluster refused the job: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"llm-platform submit: {job_id} submitted to {args.address or jobs.default_address()}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return
    try:
        res = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nllm-platform submit: stopped following; {job_id} keeps running "
              f"(llm-platform jobs stop {job_id})", file=sys.stderr)
        raise SystemExit(130) from None
    detail = f": {res.message}" if res.message and res.status != "SUCCEEDED" else ""
    print(f"llm-platform submit: {job_id} {res.status} (exit {res.exit_code}){detail}", file=sys.stderr)
    raise SystemExit(res.exit_code)
