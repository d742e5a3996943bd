"""Without --model, `predict`, `serve` and `evaluate` use the bundled demo model and say so first. A tiny exported
model stands in for it through $MINIGPT_PANCREAS_DEMO_MODEL (the real one is built by the cascade); the server
runs as a real process and is asked over HTTP. Also: the model options are the same in every command."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import SimpleITK as sitk

import backend
from backend import cli, demo_model
from backend.cli import build_parser
from SlicerMiniGPTPancreas import client as c
from SlicerMiniGPTPancreas import phantom, phantom_writers
from small_prepared import prepare_small_msd
from tiny_upstream_models import build_tiny_upstream
from training import cli as training_cli

pytestmark = pytest.mark.slow

MODEL_ID = "minigpt-pancreas-demo-test"
NOTICE = f"Using the bundled demo model {MODEL_ID} (synthetic demonstration model, not for clinical use): "
WAIT_S = 60.0  # the server process imports torch and loads the model before it answers "ok"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny model exported as the real demo model is: synthetic, with a card."""
    root = tmp_path_factory.mktemp("demo")
    files = build_tiny_upstream(root / "upstream")
    model = backend.load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint,
                                  image_size=files.sizes.image_size)
    backend.save_model_dir(model, root / "model")
    with contextlib.redirect_stdout(io.StringIO()):
        assert training_cli.main(["export", str(root / "model"), "--out", str(root / "demo"), "--synthetic",
                                  "--model-id", MODEL_ID]) == 0
    return root / "demo"


@pytest.fixture()
def bundled(demo, monkeypatch):
    monkeypatch.setenv(demo_model.ENVIRONMENT_VARIABLE, str(demo))
    return demo


def first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def test_predict_uses_the_demo_model_and_names_it_in_every_output(bundled, tmp_path, capsys):
    volume = tmp_path / "ct.nii.gz"
    ct = phantom.make_phantom(seed=1, spacing=(6.0, 6.0, 10.0), noise_hu=0.0)
    sitk.WriteImage(phantom_writers.to_sitk_image(ct), str(volume))
    out = tmp_path / "out"
    assert cli.main(["predict", str(volume), "--slices", "8:10", "--out", str(out), "--constrain-boxes",
                     "--device", "cpu"]) == 0
    assert first_line(capsys.readouterr().out) == NOTICE + str(bundled)
    assert json.loads((out / "answers.json").read_text())["model"] == MODEL_ID
    assert json.loads((out / "summary.json").read_text())["model"] == MODEL_ID
    rois = json.loads((out / "boxes.mrk.json").read_text())["markups"]
    assert rois and all(roi["controlPoints"][0]["description"].startswith(f"{MODEL_ID}, confidence ")
                        for roi in rois)


def test_without_the_demo_model_the_commands_say_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(demo_model.ENVIRONMENT_VARIABLE, str(tmp_path / "not-built"))
    assert cli.main(["predict", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "out")]) == 2
    assert cli.main(["serve", "--port", "8765"]) == 2
    assert training_cli.main(["evaluate", "--prepared", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 3 and captured.out == ""
    assert all("no bundled demo model" in line and demo_model.BUILD_COMMAND in line for line in errors)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_evaluate_uses_the_demo_model_and_names_its_folder_after_it(bundled, tmp_path, monkeypatch):
    prepared = prepare_small_msd(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert training_cli.main(["evaluate", "--prepared", str(prepared), "--tasks", "tumor_detection_msd",
                                  "--limit", "1", "--device", "cpu", "--max-new-tokens", "4"]) == 0
    assert first_line(printed.getvalue()) == NOTICE + str(bundled)
    run = json.loads((tmp_path / f"evaluation-{MODEL_ID}" / "run.json").read_text())
    assert run["model"] == str(bundled)


def test_serve_uses_the_demo_model_and_reports_its_card(bundled):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", str(port), "--device", "cpu",
                               "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              encoding="utf-8", errors="replace",  # progress bars print block characters
                              env={**os.environ, demo_model.ENVIRONMENT_VARIABLE: str(bundled)})
    try:
        with c.MiniGPTPancreasClient(f"http://127.0.0.1:{port}", read_timeout=WAIT_S) as client:
            health = _wait_for_model(client, server)
            info = client.info()
    finally:
        server.send_signal(signal.SIGINT)
        printed, errors = server.communicate(timeout=WAIT_S)
    assert server.returncode in (0, 130), errors  # 130: the command's exit status after Ctrl+C
    assert first_line(printed) == NOTICE + str(bundled)
    assert (health.model_id, info.model_id, info.synthetic) == (MODEL_ID, MODEL_ID, True)


def _wait_for_model(client: c.MiniGPTPancreasClient, server: subprocess.Popen):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server stopped: {server.communicate()[1]}"
        try:
            health = client.health()
            if health.status == "ok":
                return health
        except c.ClientError:
            pass  # not listening yet
        time.sleep(0.2)
    raise AssertionError("the server did not load the model in time")


@pytest.mark.parametrize("argv", [["predict", "ct.nii.gz"], ["serve"], ["evaluate"], ["demo"], ["bench"]])
def test_every_command_takes_the_same_model_options(argv, capsys):
    parser = build_parser("minigpt-pancreas-train", "", training_cli.COMMANDS) if argv == ["evaluate"] \
        else build_parser()
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        args = parser.parse_args([*argv, "--device", device, "--dtype", "bfloat16"])
        assert (args.device, args.dtype, args.model, args.upstream) == (device, "bfloat16", None, None)
    args = parser.parse_args([*argv, "--upstream", "vit.pth", "llama", "ckpt.pth", "--image-size", "224",
                              "--quantization", "8bit", "--batch-size", "auto"])
    assert ([str(path) for path in args.upstream], args.image_size, args.quantization, args.batch_size) == (
        ["vit.pth", "llama", "ckpt.pth"], 224, "8bit", "auto")
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--device", "gpu"])
    assert "'gpu' is not auto, cpu, cuda or cuda:N" in capsys.readouterr().err
