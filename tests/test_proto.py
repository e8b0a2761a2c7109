"""The midasheng.v1 contracts: stubs in sync, every element documented, modules usable."""

from __future__ import annotations

import importlib

import pytest
from google.protobuf import descriptor_pb2

from services.pb import SERVICE_NAMES, generate

MODULES = ("captions", "encoder", "jobs", "lm")

EXPECTED_METHODS = {
    "midasheng.v1.CaptionService": {"StreamCaptions", "Caption", "BatchCaption"},
    "midasheng.v1.EncoderService": {"OpenSession", "PushAudio", "CloseSession", "EncodeClip"},
    "midasheng.v1.LMService": {"Caption", "BatchCaption", "GetStats"},
    "midasheng.v1.JobService": {
        "CreateJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "StreamJobEvents",
        "ListAdapters",
        "GetAdapter",
    },
}

# FileDescriptorProto / DescriptorProto / ... field numbers used in SourceCodeInfo paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM, _MSG_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2


def _pb(name: str, grpc: bool = False):
    return importlib.import_module(f"services.pb.midasheng.v1.{name}_pb2{'_grpc' if grpc else ''}")


@pytest.fixture(scope="module")
def own_files() -> list[descriptor_pb2.FileDescriptorProto]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(generate.descriptor_set(include_source_info=True))
    files = [f for f in fds.file if f.package == "midasheng.v1"]
    assert sorted(f.name for f in files) == generate.proto_files()
    return files


def test_committed_stubs_match_fresh_generation() -> None:
    problems = generate.drift()
    assert not problems, "stubs drifted; run `python -m services.pb.generate`:\n" + "\n".join(problems)


def test_generation_is_deterministic() -> None:
    assert generate.render() == generate.render()


def test_check_flag_reports_drift(tmp_path) -> None:
    assert generate.main(["--out", str(tmp_path)]) == 0
    assert generate.main(["--out", str(tmp_path), "--check"]) == 0
    victim = tmp_path / "midasheng" / "v1" / "captions_pb2.pyi"
    victim.write_text(victim.read_text() + "# hand edit\n")
    (tmp_path / "midasheng" / "v1" / "old_pb2.py").write_text("")
    assert generate.main(["--out", str(tmp_path), "--check"]) == 1
    problems = generate.drift(tmp_path)
    assert any(p.startswith("differs: midasheng/v1/captions_pb2.pyi") for p in problems)
    assert any("old_pb2.py" in p for p in problems)
    # A normal run repairs the tree and removes the stale file.
    assert generate.main(["--out", str(tmp_path)]) == 0
    assert generate.drift(tmp_path) == []


def test_imports_are_rewritten_to_the_package() -> None:
    text = generate.rewrite_imports("from midasheng.v1 import captions_pb2 as c\nimport midasheng.v1.x\n")
    assert (
        text == "from services.pb.midasheng.v1 import captions_pb2 as c\nimport services.pb.midasheng.v1.x\n"
    )
    for rel, body in generate.render().items():
        for line in body.splitlines():
            assert not line.lstrip().startswith(("from midasheng", "import midasheng")), (rel, line)


def _undocumented(f: descriptor_pb2.FileDescriptorProto) -> list[str]:
    comments = {
        tuple(loc.path): loc.leading_comments.strip()
        for loc in f.source_code_info.location
        if loc.leading_comments.strip()
    }
    missing: list[str] = []

    def need(path: tuple[int, ...], what: str) -> None:
        if path not in comments:
            missing.append(f"{f.name}: {what}")

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, prefix: str) -> None:
        need(path, f"enum {prefix}{e.name}")
        for i, v in enumerate(e.value):
            need((*path, _ENUM_VALUE, i), f"enum value {prefix}{e.name}.{v.name}")

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        if m.options.map_entry:  # synthesized for map<,> fields; the field itself is checked
            return
        full = f"{prefix}{m.name}"
        need(path, f"message {full}")
        for i, fld in enumerate(m.field):
            need((*path, _MSG_FIELD, i), f"field {full}.{fld.name}")
        for i, o in enumerate(m.oneof_decl):
            if not o.name.startswith("_"):  # proto3 `optional` makes a synthetic oneof
                need((*path, _MSG_ONEOF, i), f"oneof {full}.{o.name}")
        for i, n in enumerate(m.nested_type):
            message((*path, _MSG_NESTED, i), n, f"{full}.")
        for i, e in enumerate(m.enum_type):
            enum((*path, _MSG_ENUM, i), e, f"{full}.")

    for i, m in enumerate(f.message_type):
        message((_FILE_MESSAGE, i), m, "")
    for i, e in enumerate(f.enum_type):
        enum((_FILE_ENUM, i), e, "")
    for i, s in enumerate(f.service):
        need((_FILE_SERVICE, i), f"service {s.name}")
        for j, rpc in enumerate(s.method):
            need((_FILE_SERVICE, i, _SERVICE_METHOD, j), f"rpc {s.name}.{rpc.name}")
    return missing


def test_every_element_has_a_leading_comment(own_files) -> None:
    missing = [m for f in own_files for m in _undocumented(f)]
    assert not missing, "undocumented proto elements:\n" + "\n".join(missing)


def test_comment_check_catches_a_missing_comment(own_files) -> None:
    f = descriptor_pb2.FileDescriptorProto()
    f.CopyFrom(own_files[0])
    del f.source_code_info.location[:]
    assert _undocumented(f)


def test_service_names_and_methods(own_files) -> None:
    declared = {f"{f.package}.{s.name}": {m.name for m in s.method} for f in own_files for s in f.service}
    assert declared == EXPECTED_METHODS
    assert set(SERVICE_NAMES) == set(declared)
    assert tuple(sorted(SERVICE_NAMES)) == SERVICE_NAMES
    for name in MODULES:
        pb, pb_grpc = _pb(name), _pb(name, grpc=True)
        for svc in pb.DESCRIPTOR.services_by_name.values():
            assert hasattr(pb_grpc, f"{svc.name}Stub")
            assert hasattr(pb_grpc, f"{svc.name}Servicer")
            assert hasattr(pb_grpc, f"add_{svc.name}Servicer_to_server")
            assert set(svc.methods_by_name) == EXPECTED_METHODS[svc.full_name]


def test_streaming_shapes() -> None:
    captions, jobs = _pb("captions"), _pb("jobs")
    stream = captions.DESCRIPTOR.services_by_name["CaptionService"].methods_by_name["StreamCaptions"]
    assert stream.client_streaming and stream.server_streaming
    events = jobs.DESCRIPTOR.services_by_name["JobService"].methods_by_name["StreamJobEvents"]
    assert events.server_streaming and not events.client_streaming
    assert _pb("lm").DESCRIPTOR.services_by_name["LMService"].methods_by_name["Caption"].input_type is (
        captions.CaptionRequest.DESCRIPTOR
    )


@pytest.mark.parametrize(
    "variant",
    ["config", "audio", "control"],
)
def test_stream_request_round_trip(variant: str) -> None:
    captions = _pb("captions")
    if variant == "config":
        req = captions.StreamCaptionsRequest(
            config=captions.SessionConfig(
                sample_rate_hz=48000,
                encoding=captions.FLOAT32,
                channels=2,
                prompt="Caption the audio.",
                window_seconds=10.0,
                hop_seconds=2.0,
                interim_results=True,
                adapter="birds-v1",
                language="en",
                session_id="s-1",
                resume_after_event_id="1700000000000-3",
                max_new_tokens=48,
            )
        )
    elif variant == "audio":
        req = captions.StreamCaptionsRequest(audio=captions.AudioChunk(data=b"\x00\x01" * 160, seq=7))
    else:
        req = captions.StreamCaptionsRequest(control=captions.Control(action=captions.Control.FINALIZE))
    wire = req.SerializeToString()
    back = captions.StreamCaptionsRequest.FromString(wire)
    assert back == req
    assert back.WhichOneof("request") == variant


def test_stream_response_round_trip() -> None:
    captions = _pb("captions")
    responses = [
        captions.StreamCaptionsResponse(
            started=captions.SessionStarted(
                session_id="s-1",
                effective_config=captions.SessionConfig(sample_rate_hz=16000),
                limits=captions.ServerLimits(max_chunk_bytes=1 << 20),
            )
        ),
        captions.StreamCaptionsResponse(
            caption=captions.CaptionEvent(
                event_id="1-0",
                segment_id=2,
                revision=1,
                window_start_seconds=4.0,
                window_end_seconds=14.0,
                text="a dog barks \u72d7",
                is_final=True,
                audio_processed_seconds=14.0,
            )
        ),
        captions.StreamCaptionsResponse(error=captions.StreamError(code=8, message="slow down", fatal=False)),
        captions.StreamCaptionsResponse(
            ended=captions.SessionEnded(reason=captions.SessionEnded.CLIENT_CLOSED, total_audio_seconds=14.0)
        ),
    ]
    kinds = []
    for resp in responses:
        back = captions.StreamCaptionsResponse.FromString(resp.SerializeToString())
        assert back == resp
        kinds.append(back.WhichOneof("response"))
    assert kinds == ["started", "caption", "error", "ended"]


def test_batch_and_payload_messages() -> None:
    captions, encoder, jobs = _pb("captions"), _pb("encoder"), _pb("jobs")
    batch = captions.BatchCaptionResponse(
        results=[
            captions.BatchCaptionResult(index=0, caption=captions.CaptionResponse(text="rain")),
            captions.BatchCaptionResult(index=1, error=captions.ItemError(code=3, message="not audio")),
        ]
    )
    back = captions.BatchCaptionResponse.FromString(batch.SerializeToString())
    assert [r.WhichOneof("outcome") for r in back.results] == ["caption", "error"]
    req = captions.CaptionRequest(raw_audio=captions.RawAudio(data=b"\0\0", sample_rate_hz=16000))
    assert req.WhichOneof("audio") == "raw_audio"
    assert not req.options.HasField("seed")

    tokens = encoder.AudioTokens(
        session_id="s-1",
        seq=3,
        window_index=0,
        revision=2,
        token_start=0,
        num_tokens=2,
        hidden_size=4,
        dtype=encoder.DTYPE_FLOAT32,
        data=bytes(32),
        num_final=1,
        stream_time_end_seconds=0.4,
    )
    assert encoder.AudioTokens.FromString(tokens.SerializeToString()) == tokens

    event = jobs.JobEvent(job_id="j", event_id=1, kind=jobs.JobEvent.EVAL, eval_scores={"eval_loss": 1.5})
    assert jobs.JobEvent.FromString(event.SerializeToString()).eval_scores["eval_loss"] == 1.5
    hp = jobs.Hyperparameters(lora_targets=["q_proj", "v_proj"])
    assert not hp.HasField("lora_dropout")
