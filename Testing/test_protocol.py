"""The wire protocol: exact slice/volume encoding, schema round trips, and a precise error for every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.validation import ProtocolError
from SlicerMiniGPTPancreas.wire_arrays import decode_slice, decode_volume, encode_slice, encode_volume


def _json_round_trip(message):
    """What the other side of the wire sees: to_dict -> JSON text -> dict -> from_dict."""
    return type(message).from_dict(json.loads(json.dumps(message.to_dict())))


def _query_response(**overrides):
    values = dict(answer="{<10><20><30><40>}", kind="boxes", model_id="minigpt-pancreas-demo",
                  boxes=[p.BoxResult((51.5, 102.0, 153.5, 204.0), "pancreas", 0.87)], slice_index=7,
                  queue_ms=1.5, inference_ms=250.0)
    values.update(overrides)
    return p.QueryResponse(**values)


# --- slices and volumes ---------------------------------------------------------------------------------------------

def test_encode_slice_is_little_endian_row_major_base64():
    # [[1, -2, -32768]] as little-endian int16 is the bytes 01 00 | FE FF | 00 80, i.e. base64 "AQD+/wCA".
    encoded = encode_slice(np.array([[1, -2, -32768]], dtype=np.int16))
    assert encoded == {"shape": [1, 3], "dtype": "int16", "data": "AQD+/wCA"}
    big_endian = np.array([[1, -2, -32768]], dtype=">i2")
    assert encode_slice(big_endian)["data"] == "AQD+/wCA"


def test_int16_slice_round_trips_exactly():
    rng = np.random.default_rng(0)
    slice_hu = rng.integers(-32768, 32768, size=(37, 53), dtype=np.int16)  # odd sizes: base64 padding
    slice_hu[0, :2] = (-32768, 32767)
    decoded = decode_slice(json.loads(json.dumps(encode_slice(slice_hu))))
    assert decoded.dtype == np.int16 and decoded.shape == (37, 53)
    np.testing.assert_array_equal(decoded, slice_hu)


@pytest.mark.parametrize(("payload", "field", "words"), [
    ("AQD+/wCA", "slice", "expected an object"),
    ({"shape": [1, 3], "dtype": "int16"}, "slice.data", "required field is missing"),
    ({"shape": [1, 3], "dtype": "float32", "data": "AQD+/wCA"}, "slice.dtype", "expected 'int16'"),
    ({"shape": [1, 3, 1], "dtype": "int16", "data": "AQD+/wCA"}, "slice.shape", "expected 2 dimensions"),
    ({"shape": [1, 3.0], "dtype": "int16", "data": "AQD+/wCA"}, "slice.shape[1]", "expected an integer"),
    ({"shape": [4097, 1], "dtype": "int16", "data": "AQD+/wCA"}, "slice.shape[0]", "outside the allowed range"),
    ({"shape": [0, 3], "dtype": "int16", "data": ""}, "slice.shape[0]", "outside the allowed range"),
    ({"shape": [1, 3], "dtype": "int16", "data": 12}, "slice.data", "expected a base64 string"),
    ({"shape": [1, 3], "dtype": "int16", "data": "AQD+/w"}, "slice.data", "has 6 base64 characters"),
    ({"shape": [1, 3], "dtype": "int16", "data": "AQD+/w=="}, "slice.data", "decodes to 4 bytes but"),
    ({"shape": [1, 3], "dtype": "int16", "data": "AQD!/wCA"}, "slice.data", "not valid base64"),
])
def test_decode_slice_refuses_bad_payloads(payload, field, words):
    with pytest.raises(ProtocolError) as caught:
        decode_slice(payload)
    assert caught.value.field == field
    assert words in str(caught.value)


@pytest.mark.parametrize(("array", "words"), [
    ([[1, 2]], "expected a numpy array"),
    (np.zeros((4, 4), dtype=np.float32), "expected int16 HU values, got dtype float32"),
    (np.zeros((4, 4), dtype=np.uint16), "got dtype uint16"),
    (np.zeros((2, 4, 4), dtype=np.int16), "expected 2 dimensions"),
    (np.zeros((1, 4097), dtype=np.int16), "4097 is outside the allowed range [1, 4096]"),
])
def test_encode_slice_refuses_what_the_server_would_refuse(array, words):
    with pytest.raises(ProtocolError, match="slice") as caught:
        encode_slice(array)
    assert words in str(caught.value)


def test_volume_round_trips_through_raw_body_and_query_parameters():
    volume = np.arange(-30, 30, dtype=np.int16).reshape(3, 4, 5)  # [S, R, C]
    body, params = encode_volume(volume, (0.75, 0.8, 2.5))
    assert params == {"shape": "3,4,5", "dtype": "int16", "spacing_mm": "0.75,0.8,2.5"}
    assert len(body) == 3 * 4 * 5 * 2 and body[:2] == b"\xe2\xff"  # -30 little-endian
    decoded, spacing = decode_volume(body, params)
    np.testing.assert_array_equal(decoded, volume)
    assert spacing == (0.75, 0.8, 2.5)


def test_encode_volume_refuses_more_than_the_upload_limit_before_copying():
    huge = np.broadcast_to(np.int16(0), (4096, 512, 512))  # 2 GiB of int16 as a zero-stride view: no memory
    with pytest.raises(ProtocolError, match="volume.shape: 2147483648 bytes of int16 exceed the upload limit"):
        encode_volume(huge, (1.0, 1.0, 1.0))
    with pytest.raises(ProtocolError, match=r"volume.spacing_mm: expected 3 spacings"):
        encode_volume(np.zeros((1, 2, 2), np.int16), (1.0, 1.0))


@pytest.mark.parametrize(("body", "params", "words"), [
    (b"\0" * 10, {"shape": "1,2,3", "dtype": "int16", "spacing_mm": "1,1,1"}, "body: has 10 bytes but"),
    (b"", {"shape": "1,2,3", "dtype": "int16"}, "spacing_mm: required query parameter is missing"),
    (b"", {"shape": "1,2,x", "dtype": "int16", "spacing_mm": "1,1,1"}, "comma-separated numbers"),
    (b"", {"shape": "1,2,3", "dtype": "uint8", "spacing_mm": "1,1,1"}, "expected 'int16'"),
    (b"", {"shape": "4096,4096,4096", "dtype": "int16", "spacing_mm": "1,1,1"}, "exceed the upload limit"),
    (b"\0" * 12, {"shape": "1,2,3", "dtype": "int16", "spacing_mm": "1,0,1"}, "finite positive number"),
])
def test_decode_volume_refuses_bad_uploads(body, params, words):
    with pytest.raises(ProtocolError) as caught:
        decode_volume(body, params)
    assert words in str(caught.value)


# --- versions, routes, error codes ----------------------------------------------------------------------------------

def test_api_version_majors_must_match_and_the_message_says_which_side_to_update():
    p.check_api_version("1.0")
    p.check_api_version("1.7")  # a minor difference only adds optional things
    with pytest.raises(p.ApiVersionError) as newer_server:
        p.check_api_version("2.0", "1.3")
    assert "server speaks API 2.0" in str(newer_server.value) and "client speaks API 1.3" in str(newer_server.value)
    assert "Update the client" in str(newer_server.value)
    with pytest.raises(p.ApiVersionError) as older_server:
        p.check_api_version("0.9", "1.0")
    assert "Update the server" in str(older_server.value)
    with pytest.raises(ProtocolError, match="expected a version 'MAJOR.MINOR'.*'v1'"):
        p.check_api_version("v1")


def test_routes_are_versioned_and_ids_cannot_escape_the_path():
    assert p.API_PREFIX == f"/api/v{p.API_VERSION.split('.')[0]}"
    assert p.ROUTE_HEALTH == "/healthz"
    assert p.sweep_route("job_7-a") == "/api/v1/sweeps/job_7-a"
    with pytest.raises(ProtocolError, match="job_id: expected 1-64 letters"):
        p.sweep_route("../volumes")


def test_error_codes_map_to_their_http_statuses():
    expected = {"bad_request": 400, "unauthorized": 401, "not_found": 404, "version_mismatch": 409,
                "payload_too_large": 413, "unsupported_media": 415, "validation": 422, "internal": 500,
                "busy": 503, "model_unavailable": 503}
    assert {code.value: code.http_status for code in p.ErrorCode} == expected


def test_error_response_has_the_documented_shape():
    error = p.ErrorResponse(p.ErrorCode.BUSY, "the GPU is busy")
    assert error.to_dict() == {"error": {"code": "busy", "message": "the GPU is busy"}}
    assert p.ErrorResponse.from_dict(error.to_dict()) == error and error.http_status == 503
    with pytest.raises(ProtocolError, match="ErrorResponse.error.code: expected one of .*'teapot'"):
        p.ErrorResponse.from_dict({"error": {"code": "teapot", "message": "x"}})
    with pytest.raises(ProtocolError, match="ErrorResponse.error: expected an object"):
        p.ErrorResponse.from_dict({"detail": "Not Found"})


# --- schemas --------------------------------------------------------------------------------------------------------

def test_slice_query_request_round_trip_keeps_the_slice_exact():
    slice_hu = np.array([[-1024, 40], [250, 3071]], dtype=np.int16)
    request = p.SliceQueryRequest("[refer] give me the location of the pancreas", slice_hu, [0.7, 0.75],
                                  slice_index=12, volume_id="vol-1", options=p.AnswerOptions(box_decoding="floor"))
    wire = request.to_dict()
    assert wire["slice_hu"]["shape"] == [2, 2] and wire["pixel_spacing_mm"] == [0.7, 0.75]
    assert wire["options"] == {"max_new_tokens": 20, "temperature": 0.0, "box_decoding": "floor",
                               "image_variant": "window"}
    back = _json_round_trip(request)
    np.testing.assert_array_equal(back.slice_hu, slice_hu)
    assert (back.prompt, back.pixel_spacing_mm, back.slice_index, back.volume_id, back.options) == \
        (request.prompt, (0.7, 0.75), 12, "vol-1", request.options)


@pytest.mark.parametrize("message", [
    _query_response(),
    _query_response(kind="yes_no", answer="yes", boxes=[], yes=True, yes_probability=0.93),
    _query_response(kind="invalid", answer="{<10><20>", boxes=[], reason="unterminated box"),
    p.Health("ok", "1.0", "minigpt-pancreas-demo", "cuda:0", False),
    p.ModelInfo("m", "1.0", "0.1.0", "cpu", "float32", 448, 1024, 64 << 20, ("[vqa] is there a tumor?",)),
    p.ModelInfo("m", "1.2", "0.1.0", "cpu", "float32", 448, 1024, 64 << 20, ("[vqa] is there a tumor?",),
                tasks=(p.TaskInfo("tumor_classification", "Tumour yes/no", "yes_no", ("[vqa] is there a tumor?",)),)),
    p.VolumeUploadResponse("vol-1", (80, 512, 512), (0.7, 0.7, 2.5)),
    p.SweepJobRequest("vol-1", "[refer] where is the pancreas?", 10, 40, 2),
    p.SweepJobStatus("job-1", "vol-1", "running", 2, 15, (_query_response(slice_index=10),
                                                          _query_response(slice_index=12, boxes=[]))),
    p.ChatResponse("It is at {<40><50><60><70>}", "m", (p.BoxResult((1, 2, 3, 4)),), 12.0),
])
def test_messages_survive_json_round_trips(message):
    assert _json_round_trip(message) == message


def test_chat_request_round_trip():
    turns = (p.ChatMessage("user", "where is the pancreas?"), p.ChatMessage("assistant", "{<1><2><3><4>}"),
             p.ChatMessage("user", "is there a tumour?"))
    request = p.ChatRequest(turns, np.full((3, 2), -1000, dtype=np.int16), (1.0, 1.0))
    back = _json_round_trip(request)
    assert back.messages == turns and back.options.max_new_tokens == 300
    np.testing.assert_array_equal(back.slice_hu, request.slice_hu)


def test_unknown_keys_from_a_newer_minor_version_are_ignored():
    wire = dict(p.Health("loading", "1.4", "", "cpu", True).to_dict(), gpu_memory_gb=80)
    assert p.Health.from_dict(wire).status == "loading"


def test_model_info_of_a_server_before_api_1_2_has_no_tasks_and_a_bad_task_is_named():
    older = p.ModelInfo("m", "1.1", "0.1.0", "cpu", "float32", 448, 1024, 64 << 20, ("[refer] pancreas",)).to_dict()
    del older["tasks"]
    assert p.ModelInfo.from_dict(older).tasks == ()
    task = {"name": "t", "title": "T", "kind": "maybe", "prompts": ["[refer] pancreas"]}
    with pytest.raises(ProtocolError, match=r"ModelInfo\.tasks\[0\]\.kind"):
        p.ModelInfo.from_dict({**older, "tasks": [task]})


def test_sweep_status_reports_whether_it_is_finished():
    assert not p.SweepJobStatus("j", "v", "running", 1, 3).finished
    assert all(p.SweepJobStatus("j", "v", state, 3, 3).finished for state in ("done", "cancelled", "failed"))


@pytest.mark.parametrize(("schema", "wire", "field", "words"), [
    (p.QueryResponse, {"answer": "yes", "kind": "yes_no"}, "QueryResponse.model_id", "required field is missing"),
    (p.QueryResponse, {"answer": "x", "kind": "maybe", "model_id": "m"}, "QueryResponse.kind", "expected one of"),
    (p.QueryResponse, {"answer": 3, "kind": "text", "model_id": "m"}, "QueryResponse.answer", "expected a string"),
    (p.QueryResponse, {"answer": "x", "kind": "text", "model_id": "m", "yes_probability": 1.5},
     "QueryResponse.yes_probability", "outside the allowed range"),
    (p.QueryResponse, {"answer": "x", "kind": "boxes", "model_id": "m", "boxes": {"box": [1, 2, 3, 4]}},
     "QueryResponse.boxes", "expected a list"),
    (p.QueryResponse, {"answer": "x", "kind": "boxes", "model_id": "m", "boxes": [{"box": [5, 2, 3, 4]}]},
     "QueryResponse.boxes[0].box", "min exceeds max"),
    (p.QueryResponse, {"answer": "x", "kind": "boxes", "model_id": "m", "boxes": [{"box": [1, 2, 3]}]},
     "QueryResponse.boxes[0].box", "got 3 numbers"),
    (p.QueryResponse, {"answer": "x", "kind": "boxes", "model_id": "m", "boxes": [{"box": [1, "2", 3, 4]}]},
     "QueryResponse.boxes[0].box[1]", "expected a number"),
    (p.Health, {"status": "ok", "api_version": "1.0", "model_id": "m", "device": "cpu", "busy": "no"},
     "Health.busy", "expected true or false"),
    (p.Health, ["ok"], "Health", "expected a JSON object"),
    (p.SliceQueryRequest, {"prompt": "where?", "slice_hu": {"shape": [1, 3], "dtype": "int16", "data": "AQD+/wCA"},
                           "pixel_spacing_mm": [0.7, -0.7]}, "SliceQueryRequest.pixel_spacing_mm[1]", "positive"),
    (p.SliceQueryRequest, {"prompt": "where?", "slice_hu": {"shape": [1, 3], "dtype": "int16", "data": "AQD+/w"},
                           "pixel_spacing_mm": [1, 1]}, "SliceQueryRequest.slice_hu.data", "base64 characters"),
    (p.SliceQueryRequest, {"prompt": "  ", "slice_hu": {"shape": [1, 3], "dtype": "int16", "data": "AQD+/wCA"},
                           "pixel_spacing_mm": [1, 1]}, "SliceQueryRequest.prompt", "must not be empty"),
    (p.SliceQueryRequest, {"prompt": "where?", "slice_hu": {"shape": [1, 3], "dtype": "int16", "data": "AQD+/wCA"},
                           "pixel_spacing_mm": [1, 1], "options": {"max_new_tokens": True}},
     "SliceQueryRequest.options.max_new_tokens", "expected an integer, got bool"),
    (p.SweepJobRequest, {"volume_id": "v", "prompt": "p", "slice_start": 5, "slice_stop": 5},
     "SweepJobRequest.slice_stop", "outside the allowed range [6, 4096]"),
    (p.SweepJobStatus, {"job_id": "j", "volume_id": "v", "state": "running", "done": 4, "total": 3},
     "SweepJobStatus.done", "outside the allowed range [0, 3]"),
    (p.SweepJobStatus, {"job_id": "j", "volume_id": "v", "state": "running", "done": 1, "total": 3,
                        "results": [{"answer": "x", "kind": "text", "model_id": "m"}]},
     "SweepJobStatus.results[0].slice_index", "is required in a sweep"),
    (p.ChatRequest, {"messages": [{"role": "assistant", "text": "hi"}], "pixel_spacing_mm": [1, 1],
                     "slice_hu": {"shape": [1, 3], "dtype": "int16", "data": "AQD+/wCA"}},
     "ChatRequest.messages[0].role", "alternate user/assistant"),
    (p.VolumeUploadResponse, {"volume_id": "a/b", "shape": [1, 2, 3], "spacing_mm": [1, 1, 1]},
     "VolumeUploadResponse.volume_id", "letters, digits"),
])
def test_every_bad_field_is_named_in_the_error(schema, wire, field, words):
    with pytest.raises(ProtocolError) as caught:
        schema.from_dict(wire)
    assert caught.value.field == field, str(caught.value)
    assert words in str(caught.value) and str(caught.value).startswith(field)


def test_constructing_a_message_directly_validates_it_too():
    with pytest.raises(ProtocolError, match="SliceQueryRequest.slice_hu: expected int16 HU values"):
        p.SliceQueryRequest("where?", np.zeros((4, 4)), (1.0, 1.0))
    with pytest.raises(ProtocolError, match="AnswerOptions.temperature: 3.0 is outside"):
        p.AnswerOptions(temperature=3)
