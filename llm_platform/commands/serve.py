"""`llm-platform serve`: model version -> OpenAI-compatible Ray Serve endpoint (local Ray, or a cluster)."""

from llm_platform.commands import stage_main, wait_until_interrupted
from llm_platform.config import PlatformConfig


@stage_main("serve")
def main(cfg: PlatformConfig) -> None:
    import logging

    from llm_platform import cluster, storage
    from llm_platform.serve import ingress
    from llm_platform.serve.app import deploy, undeploy

    log = logging.getLogger("llm_platform.serve")
    storage.configure(cfg.storage)
    ingress.prepare(cfg.serve.http.ingress)  # a local Ray started next runs Serve with this ingress
    address = cluster.connect(cfg.cluster)
    url = deploy(cfg.serve, cfg.storage.root, storage.settings())
    key_hint = f' -H "Authorization: Bearer ${cfg.serve.auth.api_key_env}"'
    print(f"serving {cfg.serve.model} at {url}/v1 (Ray: {address})\n"
          f"  curl {url}/v1/completions{key_hint} -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"<id from /v1/models>\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32}}'\n"
          f"  llm-platform query \"Once upon a time\" --url {url}", flush=True)
    if not cfg.serve.blocking:
        return
    try:
        wait_until_interrupted()  # Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        log.info("stopping: finishing in-flight requests")
        undeploy(cfg.serve)

