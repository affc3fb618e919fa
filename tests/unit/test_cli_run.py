"""CLI dispatch and the `run` stage selection (no Ray)."""

import signal
import subprocess
import sys

import pytest

from llm_platform.cli import _stage_flags, main
from llm_platform.config import compose
from llm_platform.errors import ConfigError
from llm_platform.runner import selected_stages


def test_unknown_stage_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown stage 'trian'" in err and "data, train, tune" in err


def test_help_lists_every_stage(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for stage in ("data", "train", "tune", "eval", "serve", "run", "submit"):
        assert f"  {stage}" in out


def test_hydra_features_work_per_stage():
    out = subprocess.run([sys.executable, "-m", "llm_platform", "data", "--cfg", "job", "data.seq_len=99"],
                         capture_output=True, text=True, check=True).stdout
    assert "seq_len: 99" in out
    bad = subprocess.run([sys.executable, "-m", "llm_platform", "data", "data.sq_len=1"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "data.sq_len" in bad.stderr


def test_from_until_flags_become_overrides():
    assert _stage_flags(["--from", "train", "--until=eval", "x=1"]) == [
        "run.from_stage=train", "run.until_stage=eval", "x=1"]
    with pytest.raises(SystemExit):
        _stage_flags(["--from"])


def test_stage_selection():
    assert selected_stages(compose("run")) == ["data", "train", "register", "eval", "promote", "serve"]
    assert selected_stages(compose("run", ["run.from_stage=train", "run.until_stage=eval"])) == [
        "train", "register", "eval"]
    assert selected_stages(compose("run", ["run.until_stage=data"])) == ["data"]
    assert selected_stages(compose("run", ["run.from_stage=promote"])) == ["promote", "serve"]
    with pytest.raises(ConfigError, match="run.from_stage='promote' is not one of the run's stages"):
        selected_stages(compose("run", ["run.stages=[data,train,register,eval,serve]", "run.from_stage=promote"]))
    # tune is the train stage run as a sweep: either name selects it.
    assert selected_stages(compose("run", ["run.stages=[data,tune,register]", "run.from_stage=train"])) == [
        "train", "register"]
    assert selected_stages(compose("run", ["run.until_stage=tune"])) == ["data", "train"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serving_commands_stop_cleanly_on_ctrl_c_or_sigterm_even_if_sigint_was_ignored(signum):
    """`run` and `serve` wait in `wait_until_interrupted`: both signals drain (KeyboardInterrupt), also when the
    shell that started the command left SIGINT ignored (a background job, a CI runner)."""
    # The child says "waiting" once wait_until_interrupted has set its SIGINT handler (the second of the two it
    # sets), so the signal is sent when the handlers are in place, not after a guessed delay.
    code = ("import signal, sys\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "set_handler = signal.signal\n"
            "def announce(signum, handler):\n"
            "    previous = set_handler(signum, handler)\n"
            "    if signum == signal.SIGINT:\n        print('waiting', flush=True)\n"
            "    return previous\n"
            "signal.signal = announce\n"
            "from llm_platform.commands import wait_until_interrupted\n"
            "try:\n    wait_until_interrupted()\n"
            "except KeyboardInterrupt:\n    print('drained', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "waiting"
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "drained" and proc.returncode == 0
