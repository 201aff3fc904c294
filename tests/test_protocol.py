"""The typed contract between coordinator and site (fednnunet.protocol), checked without a network: every request
and reply round-trips through JSON, malformed messages are refused with a kind naming the field, and the site
worker answers with error kinds rather than text another layer would have to match."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from fednnunet.protocol.codec import WireError, decode, encode
from fednnunet.protocol.envelope import error_body, ok_body, read_reply, read_request, request_body
from fednnunet.protocol.errors import ErrorKind, SiteError
from fednnunet.protocol.messages import (REQUESTS, CountRequest, Describe, FingerprintCounts, JobDone, Op,
                                         PlanSpec, FingerprintApply, TrainFinish, TrainFinishReply, TrainRound,
                                         TrainRoundReply)
from fednnunet.site.worker import HANDLERS, SiteWorker


def _sample(tp: typing.Any) -> typing.Any:
    """A value of annotation ``tp`` (the first option of a union), for round-trip checks."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return {"any": [1, "x"]}
    if origin in (typing.Union, __import__("types").UnionType):
        return _sample(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return typing.get_args(tp)[0]
    if origin is list:
        return [_sample(typing.get_args(tp)[0])]
    if origin is dict:
        return {"k": _sample(typing.get_args(tp)[1])}
    if dataclasses.is_dataclass(tp):
        return _instance(tp)
    return {bool: True, int: 3, float: 0.5, str: "s"}[tp]


def _instance(cls: type) -> typing.Any:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _sample(hints[f.name]) for f in dataclasses.fields(cls) if f.init})


def test_every_operation_has_a_request_a_reply_and_a_site_handler() -> None:
    assert set(REQUESTS) == set(Op)
    assert set(HANDLERS) == set(Op) - {Op.ECHO}  # echo is only the bench's bare-Flower client
    for op, cls in REQUESTS.items():
        assert cls.OP is op
        for message in (cls, cls.REPLY):
            value = _instance(message)
            assert decode(message, json.loads(json.dumps(encode(value))), "test") == value


def test_a_request_travels_with_its_site_name_and_is_read_back() -> None:
    request = FingerprintCounts(key_space="uint16", requests=[CountRequest(channel=0, lo=5)])
    body = json.loads(json.dumps(request_body(request, "h1")))
    assert read_request(body) == (request, "h1")
    plan = FingerprintApply(fingerprint=None, plan=PlanSpec(configurations=["2d"], planner="ExperimentPlanner",
                                                            gpu_memory_target_gb=None, num_processes=1,
                                                            global_num_cases=None))
    assert read_request(request_body(plan))[0].plan.configurations == ["2d"]


@pytest.mark.parametrize("body, words", [
    ({"op": "rm -rf", "config": {}}, "unknown operation"),
    ({"op": "train_round", "config": {"round": "1", "epoch_end": 1, "validate_delivered": False}}, "round: expected an integer"),
    ({"op": "train_round", "config": {"round": True, "epoch_end": 1, "validate_delivered": False}}, "round: expected an integer"),
    ({"op": "train_round", "config": {"round": 1, "epoch_end": 1}}, "missing field validate_delivered"),
    ({"op": "train_round", "config": {"round": 1, "epoch_end": 1, "validate_delivered": False, "path": "/etc"}},
     "unknown field(s) path"),
    ({"op": "train_finish", "config": {"validate": True, "val_best": False, "best": "../x"}}, "best"),
    ({"op": "describe", "config": {"task": "train", "sample_ahead": {"num_processes": "8"}}},
     "sample_ahead: num_processes"),
    ({"op": "describe", "config": {"task": "train"}, "site": 7}, "site name"),
])
def test_a_malformed_request_is_refused_naming_the_field(body: dict, words: str) -> None:
    with pytest.raises(WireError, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_request(body)


def test_a_reply_is_decoded_into_its_type_or_becomes_an_error_with_a_kind() -> None:
    good = ok_body(TrainRoundReply(metrics={"train_loss": 1.0}, site="h1"))
    reply = read_reply(TrainRound, json.loads(json.dumps(good)), "h1")
    assert isinstance(reply, TrainRoundReply) and reply.metrics == {"train_loss": 1.0} and reply.delta is False
    unnamed = read_reply(TrainFinish, {"ok": True, "result": {"output_folder": "o", "checkpoint": "c"}}, "h2")
    assert isinstance(unnamed, TrainFinishReply) and unnamed.site == "h2"  # who replied: the transport knows
    cases = [({"ok": True, "result": {"metrics": [1]}}, ErrorKind.MALFORMED_REPLY, "metrics: expected an object"),
             ({"ok": True, "result": {"metrics": {}, "exec": "x"}}, ErrorKind.MALFORMED_REPLY, "unknown field"),
             ({"result": {}}, ErrorKind.MALFORMED_REPLY, "no ok field"),
             ([1, 2], ErrorKind.MALFORMED_REPLY, "no ok field"),
             (error_body(ErrorKind.SESSION_LOST, "site h1: gone"), ErrorKind.SESSION_LOST, "site h1: gone"),
             ({"ok": False, "error": "x", "kind": "reboot_the_server"}, ErrorKind.MALFORMED_REPLY, "error kind")]
    for body, kind, words in cases:
        error = read_reply(TrainRound, body, "h1")
        assert isinstance(error, SiteError) and error.kind is kind and words in error, (body, error)


def test_a_site_error_is_a_string_that_keeps_its_kind() -> None:
    import copy

    error = SiteError("site h1: no training session", ErrorKind.SESSION_LOST)
    assert json.dumps({"reason": error}) == '{"reason": "site h1: no training session"}'
    assert f"left out: {error}" == "left out: site h1: no training session"
    assert copy.deepcopy(error).kind is ErrorKind.SESSION_LOST and error.kind.trainer_lost
    assert not SiteError("x", ErrorKind.REJECTED).kind.trainer_lost


def _worker_reply(worker: SiteWorker, body: dict) -> typing.Any:
    reply, arrays = worker.handle(json.loads(json.dumps(body)), {})
    assert arrays == {}
    return read_reply(REQUESTS[Op(body["op"])] if body["op"] in set(o.value for o in Op) else JobDone,
                      json.loads(json.dumps(reply)), worker.site)


def test_the_worker_answers_with_kinds(tmp_path) -> None:
    worker = SiteWorker("h1", "nonexistent", task="plan_and_preprocess")
    bad = _worker_reply(worker, {"op": "describe", "config": {"task": 3}})
    assert bad.kind is ErrorKind.BAD_REQUEST and "site h1" in bad
    unknown = _worker_reply(worker, {"op": "format_disk", "config": {}})
    assert unknown.kind is ErrorKind.BAD_REQUEST and "unknown operation" in unknown
    other_task = _worker_reply(worker, request_body(Describe(task="train")))
    assert other_task.kind is ErrorKind.REFUSED and "started for task 'plan_and_preprocess'" in other_task
    lost = _worker_reply(worker, request_body(TrainRound(round=1, epoch_end=1, validate_delivered=False)))
    assert lost.kind is ErrorKind.SESSION_LOST and lost.kind.trainer_lost and "no training session" in lost
    done = _worker_reply(worker, request_body(JobDone()))
    assert done.exiting is False and done.site == "h1" and done.replied_at >= done.received_at > 0
    renamed = _worker_reply(worker, request_body(JobDone(), site="h2"))
    assert renamed.kind is ErrorKind.REFUSED and worker.exit_requested and "known this site's key" not in renamed
    assert "the server knows this site's key as 'h2'" in renamed


def test_work_after_a_reply_that_fails_is_reported_with_the_next_request() -> None:
    worker = SiteWorker("h1", "nonexistent")

    def fails() -> None:
        raise OSError("disk full")

    worker.after_reply(fails)
    worker.run_after_reply()
    error = _worker_reply(worker, request_body(JobDone()))
    assert error.kind is ErrorKind.FAILED and "disk full" in error and "site h1" in error
    assert _worker_reply(worker, request_body(JobDone())).exiting is False  # reported once
