"""Entry points: the only modules that see the whole config (and Hydra). Each is about 100 lines at most."""

from __future__ import annotations

import logging
from collections.abc import Callable

from llm_platform.config import PlatformConfig, conf_dir, register, to_object


def stage_main(config_name: str) -> Callable[[Callable[[PlatformConfig], object]], Callable[[], None]]:
    """Wrap `fn(cfg: PlatformConfig)` as a Hydra app on `conf/<config_name>.yaml`.

    A `StageError` (bad input, bad config) becomes a one-line message and exit code 2, not a traceback.
    """
    import hydra

    from llm_platform import console

    def wrap(fn: Callable[[PlatformConfig], object]) -> Callable[[], None]:
        register()

        @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")
        def _app(cfg) -> None:
            from llm_platform.errors import StageError

            try:
                typed = to_object(cfg)  # unknown keys refused, local paths made absolute
                console.setup(config_name, verbose=typed.verbose, log_dir=typed.log_dir)
                logging.getLogger("llm_platform").setLevel(typed.log_level)
                fn(typed)
            except StageError as e:
                logging.getLogger(f"llm_platform.{config_name}").error("%s", e)
                raise SystemExit(2) from None

        _app.__doc__ = fn.__doc__
        return _app

    return wrap


def wait_until_interrupted() -> None:
    """Block until Ctrl-C or SIGTERM (`kill`, systemd, a pod being stopped), both raised as KeyboardInterrupt so the
    caller drains the same way. ray.init installed a SIGTERM handler that exits at once (skipping any clean-up),
    and a process started in the background by a shell inherits SIGINT ignored: both handlers are set here."""
    import signal
    import time

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    while True:  # Serve runs in Ray's processes; keep the driver alive until interrupted
        time.sleep(3600)

