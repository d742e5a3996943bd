"""Both command lines show a UserError as one line with exit code 2, and let anything else out with its traceback:
a ValueError or KeyError from inside the code is a bug, not the user's mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backend import cli as backend_cli
from training import cli as training_cli

REPO = Path(__file__).resolve().parents[1]


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert backend_cli.main(["info", str(tmp_path / "missing.pth")]) == 2
    assert capsys.readouterr().err == (f"minigpt-pancreas info: error: MiniGPT checkpoint not found: "
                                       f"{tmp_path / 'missing.pth'} does not exist or is not a file. Check the path.\n")
    assert training_cli.main(["evaluate", "--rescore"]) == 2
    assert capsys.readouterr().err == ("minigpt-pancreas-train evaluate: error: --rescore needs --out: the evaluation "
                                       "folder that holds the saved answers.\n")


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*_):
        raise ValueError("operands could not be broadcast together")  # what a numpy bug raises

    monkeypatch.setattr("backend.commands.info._describe_checkpoint", broken)
    with pytest.raises(ValueError, match="broadcast"):
        backend_cli.main(["info", str(tmp_path / "x.pth")])
    monkeypatch.setattr("training.evaluate.rescore", lambda *_, **__: {}["metrics"])
    with pytest.raises(KeyError):
        training_cli.main(["evaluate", "--rescore", "--out", str(tmp_path)])


def test_the_installed_command_prints_a_bugs_traceback(tmp_path):
    # In a real process: the interpreter prints the traceback and exits 1, distinct from a user error's 2.
    code = ("import sys; import backend.commands.info as info; from backend import cli\n"
            "def broken(*_): raise KeyError('vision_tower.weight')\n"
            "info._describe_checkpoint = broken\n"
            f"sys.exit(cli.main(['info', {str(tmp_path / 'x.pth')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "KeyError: 'vision_tower.weight'" in result.stderr


@pytest.mark.parametrize("argv", [["predict", "ct.nii.gz", "--device", "gpu"], ["serve", "--device", "cuda:x"]])
def test_the_backend_commands_check_device_one_way(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        backend_cli.main(argv)
    assert exited.value.code == 2
    assert "is not auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["cascade", "cascade.json", "--device", "gpu"],
                                  ["fit", "stage.json", "--device", "cuda1"]])
def test_the_training_commands_check_device_as_the_backend_does(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        training_cli.main(argv)
    assert exited.value.code == 2  # refused by argparse, before a config is read or a model loaded
    assert "is not auto, cpu, cuda or cuda:N" in capsys.readouterr().err
