"""Site replies are data (issue 24, items 4-6): names that reach file paths, the number of rounds and the FedAvg
weights are the coordinator's own, bounded by the federation's plan. Pure: fake sites, no processes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fednnunet.aggregation.site_weights import SiteReplyError, check_resumed, fingerprint_digest, fix_site_weights
from fednnunet.federation.events import EventLog
from fednnunet.protocol.errors import ErrorKind, SiteError
from fednnunet.protocol.messages import TrainInitReply
from fednnunet.training.export import write_global_model
from fednnunet.training.options import TrainOptions, default_epochs
from fednnunet.training.progress import round_line
from fednnunet.training.site_checks import check_site_infos
from fednnunet.training.state import load_models, load_state
from fednnunet.training.task import run_training_task
from test_training import _FakeCaller, _job


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _info(trainer: str = "nnUNetTrainer", configuration: str = "2d") -> dict:
    return {"trainer_name": trainer, "configuration": configuration, "plans": {"plans_name": "nnUNetPlans"},
            "dataset_json": {"labels": {}}, "dataset_fingerprint": {"spacings": []}, "state_keys": {"w": "w"},
            "inference_allowed_mirroring_axes": [0]}


def _replies(infos: dict) -> dict[str, TrainInitReply]:
    """Hand-made train_init replies: the given fields, the others as a site sends them."""
    base = {**_info(), "num_training_cases": 1, "num_validation_cases": 0, "dataset_num_cases": 1,
            "current_epoch": 0, "num_epochs": 1000, "iterations_per_epoch": 250, "build_seconds": 0.0,
            "output_folder": "", "fold": 0}
    return {s: TrainInitReply(**{**base, **fields}) for s, fields in infos.items()}


# --- names that reach file paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("trainer_name", "../../evil"), ("configuration", "../../../evil"), ("configuration", "2d/../../x"),
    ("trainer_name", "/abs"), ("configuration", ".."), ("trainer_name", "nnUNetTrainerX"), ("configuration", "3d"),
    ("trainer_name", None), ("configuration", 5),
])
def test_write_global_model_refuses_a_reply_path_and_writes_nothing(tmp_path: Path, field: str, value) -> None:
    out = tmp_path / "out"
    out.mkdir()
    before = _files(tmp_path)
    info = {**_info(), field: value}
    with pytest.raises(ValueError, match=field):
        write_global_model(out, info, TrainOptions(configuration="2d", rounds=1), "0",
                           {"w": np.zeros(2, np.float32)}, 1)
    assert _files(tmp_path) == before  # nothing written, inside the out folder or outside it


def test_write_global_model_names_folders_from_its_own_options(tmp_path: Path) -> None:
    import torch

    fold_dir = write_global_model(tmp_path, _info(), TrainOptions(configuration="2d", rounds=1), "0",
                                  {"w": np.ones(2, np.float32)}, 3)
    assert fold_dir == (tmp_path / "global" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0").resolve()
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer" and ckpt["init_args"]["configuration"] == "2d"
    assert ckpt["init_args"]["fold"] == 0 and ckpt["current_epoch"] == 3


@pytest.mark.parametrize("name, value", [("trainer", "../x"), ("plans", "a/b"), ("configuration", "..")])
def test_train_options_refuse_path_names(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        TrainOptions(**{name: value, "rounds": 1})


def test_a_reply_with_a_path_in_its_names_stops_the_run_before_anything_is_written(tmp_path: Path) -> None:
    class Hostile(_FakeCaller):
        def _replies(self, op, configs, arrays):
            replies, errors = super()._replies(op, configs, arrays)
            if op == "train_init" and "3" in replies:
                replies["3"][0].update(trainer_name="../../../../evil", configuration="../..")
            return replies, errors

    out = tmp_path / "out"
    before = _files(tmp_path)
    with pytest.raises(SiteReplyError, match="site 3: trainer_name"):
        run_training_task(_job(out, False), Hostile({"1": {"w": (2,)}, "3": {"w": (2,)}}, {}),
                          EventLog(tmp_path / "events.jsonl"))
    assert not (out / "global").exists() and not (out / "state").exists()
    assert {p for p in _files(tmp_path) - before if not p.is_relative_to(out)} == {tmp_path / "events.jsonl"}


# --- plans and dataset files written beside the global model ----------------------------------------------------
def _ffe_infos() -> dict:
    fp = {"spacings": [[1.0, 1.0]] * 5, "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}}
    plans = {"plans_name": "nnUNetPlans", "configurations": {"2d": {"batch_size": 2}}}
    return {s: {**_info(), "plans": {**copy.deepcopy(plans), "dataset_name": f"Dataset{s}"},
                "dataset_fingerprint": copy.deepcopy(fp),
                "dataset_json": {"name": s, "labels": {"bg": 0, "fg": 1}, "channel_names": {"0": "CT"}},
                "num_training_cases": 1, "num_validation_cases": 1, "dataset_num_cases": int(s)}
            for s in ("2", "3")}


def test_check_site_infos_takes_plans_only_when_every_site_agrees() -> None:
    opts = TrainOptions(configuration="2d", rounds=1)
    infos = _ffe_infos()
    got = check_site_infos(_replies(infos), opts, asym=False)
    assert got["trainer_name"] == "nnUNetTrainer" and got["plans"] == infos["2"]["plans"]
    cases = [
        ("plans", lambda i: i["3"]["plans"]["configurations"]["2d"].update(batch_size=200)),
        ("plans", lambda i: i["3"]["plans"].update(plans_name="../other")),
        ("plans", lambda i: i["2"]["plans"]["configurations"].pop("2d")),
        ("dataset_fingerprint", lambda i: i["3"]["dataset_fingerprint"].update(spacings=[[2.0, 2.0]] * 5)),
        ("dataset_json", lambda i: i["3"]["dataset_json"].update(labels={"bg": 0, "tumour": 1})),
        ("state_keys", lambda i: i["3"].update(state_keys={"w": "other"})),
        ("inference_allowed_mirroring_axes", lambda i: [x.update(inference_allowed_mirroring_axes=["../x"])
                                                        for x in i.values()]),
        ("configuration", lambda i: i["3"].update(configuration="3d_fullres")),
    ]
    for field, tamper in cases:
        infos = _ffe_infos()
        tamper(infos)
        with pytest.raises(SiteReplyError, match=field):
            check_site_infos(_replies(infos), opts, asym=False)
    # the dataset's own name may differ (dataset.json, plans' dataset_name): written from the first site
    infos = _ffe_infos()
    infos["3"]["dataset_json"]["name"] = "elsewhere"
    assert check_site_infos(_replies(infos), opts, asym=False)["dataset_json"]["name"] == "2"


# --- the number of rounds -----------------------------------------------------------------------------------------
def test_default_rounds_come_from_the_coordinators_own_rule(tmp_path: Path) -> None:
    assert default_epochs("nnUNetTrainer") == 1000
    assert default_epochs("nnUNetTrainer_5epochs") == 5 and default_epochs("nnUNetTrainer_1epoch") == 1
    assert default_epochs("nnUNetTrainer_250epochs_NoMirroring") == 250
    assert default_epochs("MyTrainer") is None and default_epochs("nnUNetTrainer_0epochs") is None
    assert TrainOptions(trainer="nnUNetTrainer_5epochs", epochs_per_round=2).total_rounds() == 2
    assert TrainOptions(trainer="MyTrainer", rounds=7).total_rounds() == 7
    with pytest.raises(ValueError, match="--rounds"):
        TrainOptions(trainer="MyTrainer")
    TrainOptions(trainer="MyTrainer", validation_only=True)  # --val trains no round

    class Reporting(_FakeCaller):  # the sites claim 10^6 epochs: not the coordinator's concern
        def _replies(self, op, configs, arrays):
            replies, errors = super()._replies(op, configs, arrays)
            for info, _ in replies.values():
                if op == "train_init":
                    info["num_epochs"] = 10**6
            self.configs = getattr(self, "configs", []) + [(op, configs)]
            return replies, errors

    caller = Reporting({"1": {"w": (2,)}, "3": {"w": (2,)}}, {}, trainer="nnUNetTrainer_5epochs")
    result = run_training_task(_job(tmp_path, False, rounds=None, trainer="nnUNetTrainer_5epochs"), caller,
                               EventLog(tmp_path / "events.jsonl"))
    assert result["rounds"] == 5 and sorted(caller.received) == [1, 2, 3, 4, 5]
    init = next(c for op, c in caller.configs if op == "train_init")
    assert all(c["rounds"] == 5 for c in init.values())  # the sites' LR schedules span the coordinator's rounds


# --- bounded weights ----------------------------------------------------------------------------------------------
def _counts(asym: bool = False) -> dict:
    """Sites 1 and 3 with 1 + 1 and 3 + 1 cases; FFE's merged fingerprint lists all 6."""
    return {s: {"num_training_cases": int(s), "num_validation_cases": 1, "dataset_num_cases": int(s) + 1,
                "dataset_fingerprint": {"spacings": [[1.0]] * ((int(s) + 1) if asym else 6)}} for s in ("1", "3")}


def test_fixed_weights_are_bounded_by_the_plan() -> None:
    fixed = fix_site_weights(_replies(_counts()), asym=False, weighting="cases")
    assert fixed.weights == {"1": 1.0, "3": 3.0} and fixed.planned_total == 6
    assert fixed.fingerprint_sha256 == fingerprint_digest({"spacings": [[1.0]] * 6})
    assert fix_site_weights(_replies(_counts()), asym=False, weighting="uniform").weights == {"1": 1.0, "3": 1.0}
    assert "3 of 4 cases, weight 3 (75.0 %)" in fixed.line()
    for value in (10**9, float("inf"), float("nan"), -1, 0, 1e9, 2.0, True, "3", None):
        counts = _counts()
        counts["3"]["num_training_cases"] = value
        with pytest.raises(SiteReplyError, match="site 3: num_training_cases"):
            fix_site_weights(_replies(counts), asym=False, weighting="cases")
    counts = _counts()  # a site declares more cases than it planned with: the sum exceeds the merged fingerprint's
    counts["3"].update(num_training_cases=40, dataset_num_cases=50)
    with pytest.raises(SiteReplyError, match=r"dataset_num_cases: the sites declare 2 \(1\) \+ 50 \(3\) = 52 "
                                             r"cases, but the federation was planned on 6"):
        fix_site_weights(_replies(counts), asym=False, weighting="cases")
    counts = _counts()  # and a fingerprint of its own to match: it is not the one the other sites hold
    counts["3"].update(dataset_num_cases=50, dataset_fingerprint={"spacings": [[1.0]] * 52})
    with pytest.raises(SiteReplyError, match="dataset_fingerprint"):
        fix_site_weights(_replies(counts), asym=False, weighting="cases")
    counts = {**_counts(), "5": {**_counts()["3"], "dataset_fingerprint": {"spacings": [[2.0]] * 6}}}
    with pytest.raises(SiteReplyError, match=r"^site 5: dataset_fingerprint"):  # the odd one out is named
        fix_site_weights(_replies(counts), asym=False, weighting="cases")
    counts = _counts()
    counts["1"]["num_training_cases"] = 3  # more training cases than its dataset holds
    with pytest.raises(SiteReplyError, match="site 1: num_training_cases: 3 training cases, but its dataset has 2"):
        fix_site_weights(_replies(counts), asym=False, weighting="cases")
    # --asym: no shared record, only each site's own fingerprint
    assert fix_site_weights(_replies(_counts(asym=True)), asym=True, weighting="cases").planned_total is None
    counts = _counts(asym=True)
    counts["3"]["dataset_num_cases"] = 9
    with pytest.raises(SiteReplyError, match="site 3: dataset_num_cases: 9 cases, but its own fingerprint lists 4"):
        fix_site_weights(_replies(counts), asym=True, weighting="cases")


def test_resume_keeps_the_weights_of_the_run() -> None:
    fixed = fix_site_weights(_replies(_counts()), asym=False, weighting="cases")
    saved = {**fixed.to_json(), "weights": {"1": 1.0, "3": 1.0}}
    assert check_resumed(fixed, saved).weights == {"1": 1.0, "3": 1.0}
    assert check_resumed(fixed, None) == fixed
    with pytest.raises(SiteReplyError, match="site 3: num_training_cases: 3 now, but 2"):
        check_resumed(fixed, {**saved, "cases": {"1": 1, "3": 2}})


@pytest.mark.parametrize("count", [10**9, float("inf"), -1, 3.0, 4, None, "3"])
def test_a_reply_count_that_is_not_the_fixed_one_is_an_update_rejection(tmp_path: Path, count) -> None:
    """Site 3 reports another training-case count in round 2: that round goes on without it."""

    class Lying(_FakeCaller):
        def _replies(self, op, configs, arrays):
            replies, errors = super()._replies(op, configs, arrays)
            if op == "train_round" and configs["3"]["round"] == 2:
                replies["3"][0]["metrics"]["num_training_cases"] = count
            return replies, errors

    caller = Lying({"1": {"w": (2,)}, "3": {"w": (2,)}}, {})
    result = run_training_task(_job(tmp_path, False, min_sites=1), caller, EventLog(tmp_path / "events.jsonl"))
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    left = [e for e in events if e["kind"] == "left_out"]
    assert len(left) == 1 and left[0]["round"] == 2 and left[0]["site"] == "3"
    assert left[0]["reason"].startswith("update rejected") and "num_training_cases" in left[0]["reason"]
    assert result["rounds"] == 3
    np.testing.assert_allclose(caller.received[3]["3"]["w"], 4.5)  # round 2's global = site 1's update alone
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["weights"] for x in lines] == [{"1": 1.0, "3": 3.0}, {"1": 1.0}, {"1": 1.0, "3": 3.0}]
    assert not math.isnan(lines[-1]["wall_seconds"])


def test_weights_are_in_every_round_record_and_line_and_saved_for_resume(tmp_path: Path) -> None:
    shapes = {"1": {"w": (2,)}, "3": {"w": (2,)}}
    run_training_task(_job(tmp_path, False, rounds=2), _FakeCaller(shapes, {}), EventLog(tmp_path / "events.jsonl"))
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["kind"] == "round"]
    assert [e["weights"] for e in rounds] == [{"1": 1.0, "3": 3.0}] * 2
    assert "1: weight 1 (25 %) loss" in rounds[0]["message"] and "3: weight 3 (75 %) loss" in rounds[0]["message"]
    assert any("FedAvg weights fixed at train_init" in e["message"] for e in events)
    state = load_state(tmp_path)
    assert state["site_weights"]["weights"] == {"1": 1.0, "3": 3.0} and state["site_weights"]["planned_total"] == 6

    # the saved weights are the run's: a resume uses them (here edited to equal ones), not a new count
    state["site_weights"]["weights"] = {"1": 1.0, "3": 1.0}
    (tmp_path / "state" / "state.json").write_text(json.dumps(state))
    before = load_models(tmp_path, state)["global"]["w"]
    caller = _FakeCaller(shapes, {})
    run_training_task(_job(tmp_path, False, rounds=3, resume=True), caller, EventLog(tmp_path / "events.jsonl"))
    after = load_models(tmp_path, load_state(tmp_path))["global"]["w"]
    np.testing.assert_allclose(after, ((before + 1) + (before + 3)) / 2)

    class Grown(_FakeCaller):  # a site that now claims more training cases than when the run started
        def _replies(self, op, configs, arrays):
            replies, errors = super()._replies(op, configs, arrays)
            if op == "train_init":
                replies["3"][0].update(num_training_cases=4, dataset_num_cases=4, num_validation_cases=0)
                for info, _ in replies.values():
                    info["dataset_fingerprint"] = {"spacings": [[1.0, 1.0]] * 6}
            return replies, errors

    with pytest.raises(SiteReplyError, match="site 3: num_training_cases: 4 now, but 3"):
        run_training_task(_job(tmp_path, False, rounds=4, resume=True), Grown(shapes, {}),
                          EventLog(tmp_path / "events.jsonl"))


def test_round_line_shows_weights_and_update_norms() -> None:
    line = round_line({"round": 1, "rounds": 2, "wall_seconds": 1.0, "overhead_seconds": 0.5,
                       "sites": {"a": {"train_loss": 0.5, "epoch_seconds": 1.0}, "b": {"epoch_seconds": 1.0}},
                       "weights": {"a": 1.0, "b": 3.0}, "update_norms": {"a": 0.1234, "b": 2.0}, "left_out": {}})
    assert "a: weight 1 (25 %) |update| 0.123 loss 0.500" in line and "b: weight 3 (75 %) |update| 2 loss" in line


# --- the norm bound in the server loop ----------------------------------------------------------------------------
def test_clip_update_norm_in_the_server_loop(tmp_path: Path) -> None:
    """Sites 1 and 3 add 1 and 3 to both weights: updates of norm sqrt(2) and 3 sqrt(2). Bounded at sqrt(2), site 3
    counts as +1 too, so the global model moves by 1 (plain FedAvg: by (1 + 9) / 4 = 2.5)."""
    caller = _FakeCaller({"1": {"w": (2,)}, "3": {"w": (2,)}}, {})
    run_training_task(_job(tmp_path, False, rounds=2, clip_update_norm=math.sqrt(2)), caller,
                      EventLog(tmp_path / "events.jsonl"))
    np.testing.assert_allclose(caller.received[2]["1"]["w"], 2.0, rtol=1e-6)  # 1.0 + 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["update_norms"] == pytest.approx({"1": math.sqrt(2), "3": 3 * math.sqrt(2)})
    assert lines[0]["clip_update_norm"] == pytest.approx(math.sqrt(2))
    assert not hasattr(TrainOptions(rounds=1, clip_update_norm=1.0).train_init("0", False), "clip_update_norm")
    with pytest.raises(ValueError, match="norm bound"):
        TrainOptions(rounds=1, clip_update_norm=-1.0)


def test_a_site_that_rebuilds_its_trainer_with_another_count_stays_out(tmp_path: Path) -> None:
    """Site 3 loses its trainer in round 1; the rebuilt one claims 99 training cases: it is not taken back."""

    class Regrown(_FakeCaller):
        inits = 0

        def _replies(self, op, configs, arrays):
            replies, errors = super()._replies(op, configs, arrays)
            if op == "train_init":
                self.inits += 1
                if self.inits > 1:
                    replies["3"][0]["num_training_cases"] = 99
            return replies, errors

    caller = Regrown({"1": {"w": (2,)}, "3": {"w": (2,)}},
                     {("3", 1): SiteError("site 3: no training session", ErrorKind.SESSION_LOST)})
    result = run_training_task(_job(tmp_path, False, min_sites=1), caller, EventLog(tmp_path / "events.jsonl"))
    assert result["rounds"] == 3
    events = (tmp_path / "events.jsonl").read_text()
    assert "site 3 could not rebuild its trainer: rebuilt, but its reply does not fit the run" in events
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(x["sites"]) for x in lines] == [["1"], ["1"], ["1"]]
