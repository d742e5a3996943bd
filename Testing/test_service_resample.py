"""A gantry-tilted volume sent to a real service (uvicorn on 127.0.0.1 around a tiny MiniGPT-v2) as stored, with its
geometry: refused naming the resample option, or resampled onto the nearest axial grid on request.

Where the boxes land is checked against the patient, not against the code under test (tilted_volume.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from backend.engine import InferenceEngine
from backend.service import create_app
from gated_engine import WAIT_S
from live_server import LiveServer
from SlicerMiniGPTPancreas import client as c
from SlicerMiniGPTPancreas.geometry import ModelView, nearest_axial_grid
from tilted_volume import assert_block_boxes_cover_the_block, tilted_ct
from tiny_upstream_models import tiny_engine

REFER = "[refer] give me the location of the pancreas"


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> InferenceEngine:
    return tiny_engine(tmp_path_factory.mktemp("tiny_upstream"))


@pytest.fixture(scope="module")
def live(engine) -> Iterator[LiveServer]:
    with LiveServer(create_app(engine, constrain_boxes=True)) as server:
        yield server


@pytest.fixture()
def api(live) -> Iterator[c.MiniGPTPancreasClient]:
    with live.client() as client:
        yield client


def test_a_tilted_volume_is_refused_naming_the_resample_option(api):
    hu, matrix = tilted_ct()
    with pytest.raises(c.RequestRejectedError, match=r"oblique.*0\.50 degrees.*resample=true") as error:
        api.upload_scan(hu, matrix)
    assert error.value.status == 422


def test_with_resample_a_tilted_volume_is_resampled_said_so_and_its_boxes_land_on_the_block(api, live, engine):
    hu, matrix = tilted_ct()
    uploaded = api.upload_scan(hu, matrix, resample=True)
    assert uploaded.resampled and uploaded.shape == (30, 22, 28)
    assert uploaded.spacing_mm == pytest.approx((0.375, 0.45, 1.25))
    stored = live.service.volumes.get(uploaded.volume_id).array  # the slices the model will see
    grid = ModelView.from_volume(np.zeros(hu.shape, np.int16), nearest_axial_grid(matrix, hu.shape))
    assert_block_boxes_cover_the_block(stored, grid)
    job = api.start_sweep(uploaded.volume_id, REFER, slice_start=8, slice_stop=11)
    deadline = time.monotonic() + WAIT_S
    while not (status := api.sweep_status(job.job_id)).finished:
        assert time.monotonic() < deadline, "the sweep did not finish"
        time.sleep(0.02)
    assert status.state == "done" and [r.slice_index for r in status.results] == [8, 9, 10]
    expected = engine.run([stored[8], stored[9], stored[10]], REFER, constrain_boxes=True)
    assert [r.answer for r in status.results] == [e.answer for e in expected]


def test_an_axial_volume_sent_as_stored_is_used_as_it_is(api, live):
    hu, matrix = tilted_ct(degrees=0.0)
    uploaded = api.upload_scan(hu, matrix, resample=True)
    assert not uploaded.resampled
    np.testing.assert_array_equal(live.service.volumes.get(uploaded.volume_id).array,
                                  ModelView.from_volume(hu, matrix).array)
