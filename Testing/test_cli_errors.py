"""The two command lines: one check of --device for every command."""

from __future__ import annotations

import pytest

from backend import cli as backend_cli
from training import cli as training_cli


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
