"""`llm-platform explain "prompt" [overrides]` writes PNG and HTML heatmaps; a missing model is named."""

import os

import pytest
from fixtures import evals as fx

from llm_platform.commands import explain as explain_cmd


def test_split_args():
    assert explain_cmd.split_args(["hello there", "eval.model=x"]) == ("hello there", ["eval.model=x"])
    with pytest.raises(SystemExit, match="exactly one prompt"):
        explain_cmd.split_args(["eval.model=x"])


def test_explain_command_writes_heatmaps(tmp_path, capsys):
    model = str(tmp_path / "m")
    fx.build_gpt2(model)
    out = str(tmp_path / "out")
    explain_cmd.main(["the nurse said that", f"eval.model={model}", f"eval.explain.output_uri={out}",
                      "eval.explain.method=integrated_gradients", "eval.explain.ig_steps=8"])
    assert sorted(os.listdir(out)) == ["attention.png", "explain.html", "saliency.png"]
    printed = capsys.readouterr().out
    assert "integrated_gradients top tokens" in printed and "next token" in printed


def test_explain_command_names_a_missing_model(tmp_path, capsys, caplog):
    with pytest.raises(SystemExit) as e:
        explain_cmd.main(["hi", f"eval.model={tmp_path}/ghost", f"storage.root={tmp_path}"])
    assert e.value.code == 2
    assert f"{tmp_path}/ghost" in caplog.text + capsys.readouterr().err
