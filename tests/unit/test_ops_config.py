"""Operations settings that cannot work are refused at start-up, naming what is wrong: an OTLP
endpoint that does not suit the protocol the environment selects, KV-event fields vLLM does not
know, a publisher endpoint this host cannot bind. And the trace context a caller sends is read."""

from __future__ import annotations

import pytest
import zmq

from stream2llm.engine.config import EngineConfig, check_config, engine_args
from stream2llm.engine.tracing import PROTOCOL_ENV, check_endpoint, trace_headers


@pytest.mark.parametrize(
    ("protocol", "endpoint"),
    [
        ("grpc", "collector:4317"),
        ("grpc", "http://collector:4317"),
        ("http/protobuf", "http://c:4318/v1/traces"),
    ],
)
def test_endpoints_that_suit_the_protocol_pass(monkeypatch, protocol, endpoint):
    monkeypatch.setenv(PROTOCOL_ENV, protocol)
    assert check_endpoint(endpoint) == protocol


@pytest.mark.parametrize(
    ("protocol", "endpoint", "expected"),
    [
        ("http/protobuf", "collector:4318", "expected http://host:4318/v1/traces"),
        ("grpc", "collector:notaport", "expected host:4317"),
        ("grpc", "", "expected host:4317"),
        ("zipkin", "collector:4317", "expected grpc or http/protobuf"),
    ],
)
def test_a_bad_otlp_endpoint_or_protocol_is_refused_by_name(monkeypatch, protocol, endpoint, expected):
    monkeypatch.setenv(PROTOCOL_ENV, protocol)
    with pytest.raises(ValueError, match=expected):
        check_config(EngineConfig(otlp_traces_endpoint=endpoint))


def test_a_kv_events_field_vllm_does_not_know_is_refused_by_name():
    with pytest.raises(ValueError, match=r"kv_events=.*endpont"):
        check_config(EngineConfig(kv_events={"endpont": "tcp://*:5557"}))


def test_a_kv_events_endpoint_in_use_is_refused_at_start(tmp_path):
    taken = zmq.Context.instance().socket(zmq.PUB)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(ValueError, match=f"kv_events endpoint 'tcp://\\*:{port}'.*in use"):
            check_config(EngineConfig(kv_events={"endpoint": f"tcp://*:{port}"}))
    finally:
        taken.close(linger=0)
    check_config(EngineConfig(kv_events={"endpoint": f"ipc://{tmp_path / 'kv.sock'}"}))  # free: passes


def test_kv_events_reach_vllms_engine_args_switched_on(tiny_model):
    from stream2llm.engine import models

    config = EngineConfig(model="tiny", kv_events={"endpoint": "tcp://*:5599", "topic": "kv"})
    events = engine_args(config, models.resolve("tiny"), "/dev/null").kv_events_config
    assert events.enable_kv_cache_events and events.publisher == "zmq"
    assert (events.endpoint, events.topic) == ("tcp://*:5599", "kv")


def test_only_the_w3c_trace_context_is_taken_from_a_callers_headers():
    headers = {"traceparent": "00-ab-cd-01", "tracestate": "x=1", "authorization": "Bearer secret"}
    assert trace_headers(headers) == {"traceparent": "00-ab-cd-01", "tracestate": "x=1"}
    assert trace_headers(None) == {} and trace_headers({"accept": "*/*"}) == {}
