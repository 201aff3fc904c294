"""Federated training: pure pieces (options, server state) and end-to-end runs with real Flower processes.

The end-to-end tests share one planned 2-site synthetic 2D federation (module fixture): FFE planning, a seeded
2-round FedAvg run, find_best_configuration and the nnUNetv2_predict it prints run at a site, the seeded run
repeated as one round plus a resume (bit for bit the same), then AsymFedAvg planning and a 2-round asym run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fednnunet.protocol.errors import ErrorKind, SiteError
from fednnunet.training.options import TrainOptions
from fednnunet.training.progress import round_line
from fednnunet.training.state import load_models, load_state, save_state
from fednnunet.processes import descendants, is_running

NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "OMP_NUM_THREADS")
TRAIN_FLAGS = ["--rounds", "2", "--iterations-per-round", "2", "--val-iterations", "1", "--da-workers", "0"]


# --- pure ----------------------------------------------------------------------------------------------------
def test_train_options_round_trip_and_checks() -> None:
    opts = TrainOptions(configuration="2d", folds=["0", "all"], rounds=3, weighting="uniform")
    assert TrainOptions.from_dict(opts.asdict()) == opts
    request = opts.train_init("all", continue_training=True)
    assert request.fold == "all" and request.continue_training and not hasattr(request, "weighting")
    with pytest.raises(ValueError, match="unknown training option"):
        TrainOptions.from_dict({"configuration": "2d", "bogus": 1})
    with pytest.raises(ValueError):
        TrainOptions(weighting="median")
    with pytest.raises(ValueError):
        TrainOptions(folds=["x"])
    with pytest.raises(ValueError):
        TrainOptions(validation_only=True, resume=True)
    with pytest.raises(ValueError, match="seed"):
        TrainOptions(seed=-1)


@pytest.mark.parametrize("asym", [False, True])
def test_state_save_and_load(tmp_path: Path, asym: bool) -> None:
    rng = np.random.default_rng(0)
    models = ({"a": {"w": rng.normal(size=(2, 3)).astype(np.float32)}, "b": {"w": np.ones(4, np.float32)}}
              if asym else {"global": {"enc.w": rng.normal(size=(3,)).astype(np.float32),
                                       "n": np.array(5, np.int64)}})
    save_state(tmp_path, 1, models, asym, [{"round": 1}], {"rounds": 4})
    save_state(tmp_path, 2, models, asym, [{"round": 1}, {"round": 2}], {"rounds": 4})
    state = load_state(tmp_path)
    assert state["round"] == 2 and state["rounds"] == 4 and len(state["history"]) == 2
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["round_0002.npz", "state.json"]
    loaded = load_models(tmp_path, state)
    assert loaded.keys() == models.keys()
    for key, model in models.items():
        for name, arr in model.items():
            np.testing.assert_array_equal(loaded[key][name], arr)
            assert loaded[key][name].dtype == arr.dtype


def test_round_line() -> None:
    line = round_line({"round": 3, "rounds": 10, "wall_seconds": 5.0, "overhead_seconds": 1.5,
                       "sites": {"901": {"train_loss": 0.5, "val_loss": 0.6, "mean_fg_dice": None,
                                         "epoch_seconds": 3.5}}, "left_out": {"902": "timeout"}})
    assert line.startswith("round 3/10 | 901: loss 0.500/0.600 dice nan 3.5s | 902: left out")
    assert line.endswith("overhead 1.5s")


# --- end to end ----------------------------------------------------------------------------------------------
def _run_cli(argv: list[str]) -> int:
    from fednnunet.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    """Two synthetic 2D sites, planned and preprocessed with FFE; nnU-Net variables set for launched processes."""
    from fednnunet.data.synthetic import write_demo_federation

    root = tmp_path_factory.mktemp("fedtrain")
    saved = {v: os.environ.get(v) for v in NNUNET_VARS}
    for var in NNUNET_VARS[:3]:
        os.environ[var] = str(root / var)
        (root / var).mkdir()
    os.environ["OMP_NUM_THREADS"] = "1"  # two sites share two cores
    try:
        write_demo_federation(root / "nnUNet_raw", first_id=901, sites=2, dim=2, seed=0)
        assert _run_cli(["run", "plan_and_preprocess", "901 902", "-c", "2d", "--out", str(root / "plan")]) == 0
        yield root
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


def _site_folder(root: Path, dataset: str) -> Path:
    (folder,) = (root / "nnUNet_results").glob(f"Dataset{dataset}_*/nnUNetTrainer__nnUNetPlans__2d")
    return folder


def test_ffe_training_end_to_end(federation: Path) -> None:
    import torch

    out = federation / "train_ffe"
    assert _run_cli(["run", "train", "901 902", "2d", "0", *TRAIN_FLAGS, "--seed", "7", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["ok"] and result["rounds"] == 2 and sorted(result["sites"]) == ["901", "902"]

    site_a = _weights(_site_folder(federation, "901") / "fold_0" / "checkpoint_final.pth")
    site_b = _weights(_site_folder(federation, "902") / "fold_0" / "checkpoint_final.pth")
    glob = _weights(out / "global" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth")
    assert list(site_a) == list(site_b) == list(glob)
    for key in site_a:
        assert torch.equal(site_a[key], site_b[key]), key
        assert torch.equal(site_a[key], glob[key]), key
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (out / "global" / "nnUNetTrainer__nnUNetPlans__2d" / name).is_file()
    assert (_site_folder(federation, "901") / "fold_0" / "validation" / "summary.json").is_file()
    # every site's final validation and the pooled one, at the coordinator
    rows = json.loads((out / "cross_validation.json").read_text())["rows"]
    assert list(rows) == ["fold 0"] and set(rows["fold 0"]["sites"]) == {"901", "902"}
    assert rows["fold 0"]["pooled"]["num_cases"] == sum(s["num_cases"] for s in rows["fold 0"]["sites"].values())

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert all(set(x["sites"]) == {"901", "902"} for x in lines)
    assert load_state(out)["round"] == 2 and (out / "progress.png").stat().st_size > 0
    # the FedAvg weights: fixed at train_init, bounded by the merged fingerprint's case total, in every round
    fixed = load_state(out)["site_weights"]
    assert sum(fixed["declared"].values()) == fixed["planned_total"] > 0
    assert all(x["weights"] == {s: float(n) for s, n in fixed["cases"].items()} for x in lines)
    assert all(0 < fixed["cases"][s] <= fixed["declared"][s] for s in ("901", "902"))
    # the model each site received was validated before its epoch (nnU-Net's online validation): the initial
    # model in round 1, the aggregate after round 1 in round 2, the final one after the last round
    assert [x["delivered_model_round"] for x in lines] == [0, 1]
    for x in lines:
        for m in x["sites"].values():
            assert m["delivered"]["num_val_cases"] > 0 and 0.0 <= m["delivered"]["mean_fg_dice"] <= 1.0
    assert set(result["final_model_validation"]["sites"]) == {"901", "902"}
    assert "(delivered " in (out / "events.jsonl").read_text()
    # checkpoint_best.pth: the best delivered model, the same at every site and beside the global model
    best = result["best_model"]["model_round"]
    assert best in (0, 1, 2)
    best_global = _weights(out / "global" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_best.pth")
    for dataset in ("901", "902"):
        site_best = _weights(_site_folder(federation, dataset) / "fold_0" / "checkpoint_best.pth")
        assert all(torch.equal(site_best[k], best_global[k]) for k in best_global)
    state = load_state(out)
    for key, arr in load_models(out, state, state["best"]["weights_file"])["global"].items():
        np.testing.assert_array_equal(best_global[key].numpy(), arr)
    shutil.copytree(out / "global", federation / "seed7" / "global")  # for test_seeded_run_repeats_bit_for_bit
    shutil.copy(out / "metrics.jsonl", federation / "seed7")
    # the final aggregated model is the one the server saved after the last round
    saved = load_models(out, load_state(out))["global"]
    for key, arr in saved.items():
        np.testing.assert_array_equal(glob[key].numpy(), arr)


def test_find_best_configuration_then_its_commands_predict_at_a_site(federation: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`fednnunet run find_best_configuration` on the trained fold (sites opt in to per-case values), then the
    nnUNetv2_predict and nnUNetv2_apply_postprocessing commands it printed for site 901 run there as printed
    (placeholders filled in, CPU flags added): the federated model is an ordinary nnU-Net model."""
    if not (_site_folder(federation, "901") / "fold_0" / "checkpoint_final.pth").is_file():
        pytest.skip("needs the FFE training test")
    # nnU-Net's default worker count at the sites (it prints it into the postprocessing command): one, not eight
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    out = federation / "best"
    assert _run_cli(["run", "find_best_configuration", "901 902", "-c", "2d", "-f", "0", "--share-per-case",
                     "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["ok"] and result["best"] == "nnUNetTrainer__nnUNetPlans__2d"
    assert result["round_trips"] == 5  # evaluate, three postprocessing steps (all foreground, ring, core), finish
    cv = json.loads((out / "cross_validation.json").read_text())
    row = cv["rows"]["nnUNetTrainer__nnUNetPlans__2d"]
    assert set(row["sites"]) == {"901", "902"}
    assert row["pooled"]["num_cases"] == sum(s["num_cases"] for s in row["sites"].values()) > 0
    assert {s: len(c["nnUNetTrainer__nnUNetPlans__2d"]) for s, c in cv["per_case"].items()} == \
        {s: v["num_cases"] for s, v in row["sites"].items()}
    assert (out / "best_configuration.json").is_file()

    instructions = result["sites"]["901"]["instructions"]
    images = next((federation / "nnUNet_raw").glob("Dataset901_*")) / "imagesTr"
    inp = tmp_path / "in"
    inp.mkdir()
    first = sorted(images.iterdir())[0]
    shutil.copy(first, inp / first.name)
    commands = [line.split() for line in instructions.splitlines() if line.startswith("nnUNetv2_")]
    assert [c[0] for c in commands] == ["nnUNetv2_predict", "nnUNetv2_apply_postprocessing"]
    assert commands[1][commands[1].index("-np") + 1] == "1"
    places = {"INPUT_FOLDER": str(inp), "OUTPUT_FOLDER": str(tmp_path / "pred"),
              "OUTPUT_FOLDER_PP": str(tmp_path / "pp")}
    extra = {"nnUNetv2_predict": ["-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]}
    for command in commands:
        argv = [str(Path(sys.executable).parent / command[0])] + [places.get(a, a) for a in command[1:]]
        proc = subprocess.run(argv + extra.get(command[0], []), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, " ".join(argv) + proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1
    assert len(list((tmp_path / "pp").glob("*.nii.gz"))) == 1


def _global_weights(out: Path, name: str) -> dict:
    return _weights(out / "global" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / name)


def _losses(out: Path) -> list:
    return [{s: (m["train_loss"], m["val_loss"], m["delivered"]["mean_fg_dice"])
             for s, m in json.loads(x)["sites"].items()} for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_seeded_run_repeated_through_a_resume_is_bit_for_bit_the_same(federation: Path) -> None:
    """The seeded FFE run of test_ffe_training_end_to_end (kept in seed7/) repeated in two legs: one round, then
    ``--resume --rounds 2`` (a finished run extended: the sites continue from their own checkpoints, the server from
    its state). It ends with the same final and best models bit for bit and the same losses and delivered
    pseudo-Dice every round (CPU, --da-workers 0): the seeds and the aggregation order fix the run, and a resume
    draws what an uninterrupted run draws. (That another seed gives another model: test_site_trainer.py.)"""
    import torch

    first = federation / "seed7"
    if not first.is_dir():
        pytest.skip("needs the FFE training test")
    out = federation / "train_ffe_resumed"
    one_round = [f if f != "2" or i != 1 else "1" for i, f in enumerate(TRAIN_FLAGS)]  # --rounds 1
    assert one_round[:2] == ["--rounds", "1"]
    assert _run_cli(["run", "train", "901 902", "2d", "0", *one_round, "--seed", "7", "--skip-val",
                     "--out", str(out)]) == 0
    assert _run_cli(["run", "train", "901 902", "2d", "0", *TRAIN_FLAGS, "--seed", "7", "--skip-val", "--resume",
                     "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2] and load_state(out)["round"] == 2
    events = (out / "events.jsonl").read_text()
    assert "resuming after round 1 of 2" in events and "round 1/2" not in events
    ckpt = torch.load(_site_folder(federation, "901") / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    assert ckpt["current_epoch"] == 2  # the site continued its own nnU-Net epoch counter
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        a, b = _global_weights(first, name), _global_weights(out, name)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert _losses(first) == _losses(out)


def test_ffe_with_averaged_site_momentum(federation: Path) -> None:
    """``--momentum average`` with float16 transfer: the sites' SGD momentum buffers travel beside the weights (both
    ways, so a round moves twice the bytes), are averaged like them, and never reach a checkpoint's network
    weights; the run ends with one global model as usual."""
    import torch

    from fednnunet.aggregation.momentum import MOMENTUM_PREFIX, split_momentum

    out = federation / "train_ffe_momentum"
    assert _run_cli(["run", "train", "901 902", "2d", "0", *TRAIN_FLAGS, "--seed", "7", "--skip-val",
                     "--momentum", "average", "--transfer-dtype", "float16", "--out", str(out)]) == 0
    glob = _weights(out / "global" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth")
    site = _weights(_site_folder(federation, "901") / "fold_0" / "checkpoint_final.pth")
    assert list(glob) == list(site) and all(torch.equal(glob[k], site[k]) for k in glob)
    saved = load_models(out, load_state(out))["global"]
    weights, momentum = split_momentum(saved)
    assert set(momentum) == set(weights) and len(saved) == 2 * len(weights)
    # the averaged buffers of round 2 (zero only where the gradient is: conv biases before an InstanceNorm, the
    # deepest segmentation head, which deep supervision weights 0)
    assert all(np.any(m != 0) for k, m in momentum.items() if k.endswith("conv.weight"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    weight_bytes = sum(a.nbytes for a in weights.values())
    for x in lines:
        for traffic in x["bytes"].values():  # float16: each way, half of 2 x the float32 weights, plus framing
            assert weight_bytes <= traffic["sent"] < 1.1 * weight_bytes
            assert weight_bytes <= traffic["received"] < 1.1 * weight_bytes
    assert any(k.startswith(MOMENTUM_PREFIX) for k in saved)
    assert "site momentum average" in (out / "events.jsonl").read_text()


# --- the server loop against fake sites (no processes) -------------------------------------------------------------
class _FakeCaller:
    """Sites that answer like site workers: each 'epoch' adds the site's number to every weight.

    The SiteCaller contract over fake sites: ``_replies`` sees what a site would (the operation's name, each site's
    request as its JSON fields, the arrays) and answers plain dicts, which reach the coordinator decoded and checked
    by the protocol (``read_reply``), as over the network."""

    def __init__(self, shapes: dict[str, dict[str, tuple[int, ...]]], fail: dict[tuple[str, int], SiteError],
                 step: float | None = None, delta_dtype: str | None = None, asym: bool = False,
                 trainer: str = "nnUNetTrainer") -> None:
        """``fail``: (site, round) -> the SiteError of its train_round; ``step``: what an 'epoch' adds (default:
        the site's number); ``delta_dtype``: reply like a real site
        with a narrower transfer dtype, i.e. the change from the received weights (aggregation/wire.py);
        ``asym``: every site planned alone (its fingerprint lists its own cases, not the federation's)."""
        from fednnunet.protocol.caller import TrafficCounter

        self.shapes, self.fail, self.traffic = shapes, fail, TrafficCounter()
        self.exchange_times: dict[str, tuple[float, float]] = {}
        self.asym, self.trainer = asym, trainer
        self.step, self.delta_dtype = step, delta_dtype
        self.received: dict[int, dict[str, dict[str, np.ndarray]]] = {}

    @property
    def sites(self) -> list[str]:
        return list(self.shapes)

    def broadcast(self, request, arrays=None, timeout_s=None):
        from fednnunet.protocol.messages import Describe, DescribeReply

        assert isinstance(request, Describe)
        return {s: (DescribeReply(dataset_name=f"Dataset{s}", num_cases=int(s) + 1, dataset_json={}, version="0"), {})
                for s in self.shapes}

    def call(self, requests, arrays=None, timeout_s=None):
        from fednnunet.protocol.caller import SiteFailure

        replies, errors = self.try_call(requests, arrays, timeout_s)
        if errors:
            raise SiteFailure(next(iter(requests.values())).OP.value, errors)
        return replies

    def try_call(self, requests, arrays=None, timeout_s=None, on_reply=None, expected_s=None):
        """The transport's contract: each successful reply goes through ``on_reply`` (if given) as it arrives."""
        from fednnunet.protocol.codec import encode
        from fednnunet.protocol.envelope import read_reply

        if not requests:
            return {}, {}
        request_type = type(next(iter(requests.values())))
        answers, errors = self._replies(request_type.OP.value, {s: encode(r) for s, r in requests.items()}, arrays)
        replies = {}
        for site, (answer, out) in answers.items():
            reply = read_reply(request_type, {"ok": True, "result": answer}, site)
            if isinstance(reply, SiteError):  # the reply does not have the operation's shape
                errors[site] = reply
            else:
                replies[site] = (reply, out)
        if on_reply is not None:
            for site in list(replies):
                problem = on_reply(site, *replies[site])
                if problem is None:
                    replies[site] = (replies[site][0], {})
                else:
                    del replies[site]
                    errors[site] = problem
        return replies, errors

    def _replies(self, op, configs, arrays):
        replies, errors = {}, {}
        for site, cfg in configs.items():
            if op == "train_init":
                weights = {k: np.full(v, float(site), np.float32) for k, v in self.shapes[site].items()}
                # a site's dataset: its training cases plus one validation case; FFE's merged fingerprint lists
                # one spacing per case of every site
                planned = [int(site) + 1] if self.asym else [int(s) + 1 for s in self.shapes]
                info = {"num_training_cases": int(site), "num_validation_cases": 1,
                        "dataset_num_cases": int(site) + 1, "current_epoch": 0, "num_epochs": 1000,
                        "iterations_per_epoch": 250, "build_seconds": 0.1, "output_folder": f"/results/{site}",
                        "trainer_name": self.trainer, "configuration": "2d", "fold": 0,
                        "inference_allowed_mirroring_axes": [0, 1],
                        "plans": {"dataset_name": f"Dataset{site}", "plans_name": "nnUNetPlans",
                                  "configurations": {"2d": {}}},
                        "dataset_json": {"name": f"site {site}", "labels": {"background": 0, "fg": 1}},
                        "dataset_fingerprint": {"spacings": [[1.0, 1.0]] * sum(planned)},
                        "state_keys": {k: k for k in weights}}
                replies[site] = (info, weights)
            elif op == "train_round":
                r = cfg["round"]
                # a copy, as a network would deliver: the server may reuse its arrays after sending
                self.received.setdefault(r, {})[site] = {k: v.copy() for k, v in arrays[site].items()}
                if (site, r) in self.fail:
                    errors[site] = self.fail[(site, r)]
                    continue
                step = float(site) if self.step is None else self.step
                update = {k: v + step for k, v in arrays[site].items()}
                result = {"metrics": {"train_loss": 1.0 / r, "val_loss": 1.0, "mean_fg_dice": 0.5,
                                      "epoch_seconds": 0.01, "num_training_cases": int(site)}}
                if self.delta_dtype:
                    from fednnunet.aggregation import delta_to_wire

                    received = {k: v.astype(np.float32) for k, v in arrays[site].items()}
                    trained = {k: v + np.float32(step) for k, v in received.items()}
                    update, result["delta"] = delta_to_wire(trained, received, self.delta_dtype), True
                replies[site] = (result, update)
            elif op == "train_finish":
                replies[site] = ({"output_folder": f"/results/{site}",
                                  "checkpoint": f"/results/{site}/checkpoint_final.pth"}, {})
        return replies, errors


def _job(tmp_path: Path, asym: bool, **train):
    from fednnunet.federation.job import JobSpec

    base = {"configuration": "2d", "rounds": 3, "skip_validation": True, **train}
    return JobSpec(task="train", num_sites=2, out_dir=str(tmp_path), asym=asym, train=base)


def test_server_loop_fedavg_weights_leave_out_and_resume(tmp_path: Path) -> None:
    from fednnunet.federation.events import EventLog
    from fednnunet.training.task import run_training_task

    shapes = {"1": {"w": (2,)}, "3": {"w": (2,)}}
    caller = _FakeCaller(shapes, {("3", 2): SiteError("no reply within 5 s", ErrorKind.TIMEOUT)})
    events = EventLog(tmp_path / "events.jsonl")
    result = run_training_task(_job(tmp_path, False, min_sites=1), caller, events)
    # round 1: start from site "1"'s weights (1.0); updates 2.0 (w=1) and 4.0 (w=3) -> 3.5
    np.testing.assert_allclose(caller.received[2]["1"]["w"], 3.5)
    # round 2: site 3 left out -> the global is site 1's update 4.5; round 3 sends it to both
    np.testing.assert_allclose(caller.received[3]["3"]["w"], 4.5)
    assert "round 2: site 3 left out: no reply within 5 s" in (tmp_path / "events.jsonl").read_text()
    assert result["rounds"] == 3 and sorted(result["sites"]) == ["1", "3"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(x["sites"]) for x in lines] == [["1", "3"], ["1"], ["1", "3"]]

    # resume with more rounds: continues at round 4 from the saved global model
    caller2 = _FakeCaller(shapes, {})
    run_training_task(_job(tmp_path, False, rounds=4, resume=True), caller2, events)
    assert list(caller2.received) == [4]
    saved = load_models(tmp_path, load_state(tmp_path))["global"]["w"]
    final3 = (1 * 5.5 + 3 * 7.5) / 4  # round 3 result: (4.5+1)*1 and (4.5+3)*3, weighted
    np.testing.assert_allclose(caller2.received[4]["1"]["w"], final3)
    np.testing.assert_allclose(saved, (1 * (final3 + 1) + 3 * (final3 + 3)) / 4)
    assert (tmp_path / "global" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth").is_file()


@pytest.mark.parametrize("asym", [False, True])
def test_server_keeps_the_best_delivered_model(tmp_path: Path, asym: bool) -> None:
    """Sites report the delivered model's pseudo-Dice; the best pooled one (weighted by validation cases) is sent
    to the sites at the end as checkpoint_best.pth, and kept in the state across a resume."""
    from fednnunet.federation.events import EventLog
    from fednnunet.training.task import run_training_task

    # per delivered model (the aggregate after round 0, 1, ...); pooled with 1 and 3 validation cases:
    # 0.1, 0.6, 0.5, 0.375, 0.95: the model after round 1 is the best, though site 3 peaks after round 2
    dice = {"1": [0.1, 0.9, 0.2, 0.3, 0.9], "3": [0.1, 0.5, 0.6, 0.4, 1.0]}

    class Validating(_FakeCaller):
        finish: tuple = ()

        def _replies(self, op, configs, arrays):
            if op == "train_validate_delivered":  # the final model: the aggregate after the last round
                last = max(self.received)
                return {s: ({"delivered": self.report(s, last)}, {}) for s in configs}, {}
            replies, errors = super()._replies(op, configs, arrays)
            for s, (result, _) in replies.items():
                if op == "train_round" and configs[s]["validate_delivered"]:
                    result["metrics"]["delivered"] = self.report(s, configs[s]["round"] - 1)
            if op == "train_finish":
                self.finish = (configs, arrays)
            return replies, errors

        @staticmethod
        def report(site: str, model_round: int) -> dict:
            return {"mean_fg_dice": dice[site][model_round], "pseudo_dice": [dice[site][model_round]],
                    "val_loss": 0.5, "num_val_cases": int(site), "seconds": 0.01}

    shapes = {"1": {"w": (2,)}, "3": {"w": (2,)}}
    caller = Validating(shapes, {}, asym=asym)
    run_training_task(_job(tmp_path, asym), caller, EventLog(tmp_path / "events.jsonl"))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["delivered_mean_fg_dice"] for x in lines] == pytest.approx([0.1, 0.6, 0.5])
    assert [x["best"]["model_round"] for x in lines] == [0, 1, 1]
    configs, arrays = caller.finish
    assert all(c["best"] == "sent" for c in configs.values())
    for site in shapes:  # the model the sites received in round 2 (FFE: (1 * 2 + 3 * 4) / 4 for both)
        np.testing.assert_array_equal(arrays[site]["best/w"], caller.received[2][site]["w"])
    state = load_state(tmp_path)
    assert state["best"]["model_round"] == 1 and state["best"]["score"] == pytest.approx(0.6)
    saved_best = load_models(tmp_path, state, state["best"]["weights_file"])
    np.testing.assert_array_equal(saved_best["1" if asym else "global"]["w"], caller.received[2]["1"]["w"])
    if not asym:
        best_ckpt = tmp_path / "global" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_best.pth"
        np.testing.assert_array_equal(_weights(best_ckpt)["w"].numpy(), caller.received[2]["1"]["w"])
    assert "checkpoint_best.pth: the delivered model after round 1" in (tmp_path / "events.jsonl").read_text()

    # one more round: the final model (pooled 0.95) becomes the best; the sites save the final one as best
    caller2 = Validating(shapes, {}, asym=asym)
    run_training_task(_job(tmp_path, asym, rounds=4, resume=True), caller2, EventLog(tmp_path / "events.jsonl"))
    configs, arrays = caller2.finish
    assert all(c["best"] == "final" for c in configs.values()) and not any("best/w" in a for a in arrays.values())
    state = load_state(tmp_path)
    assert state["best"]["model_round"] == 4 and sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "best_0004.npz", "round_0004.npz", "state.json"]


def test_server_loop_min_sites_and_rejected_update(tmp_path: Path) -> None:
    from fednnunet.federation.events import EventLog
    from fednnunet.training.task import run_training_task

    caller = _FakeCaller({"1": {"w": (2,)}, "2": {"w": (2,)}},
                         {("2", 1): SiteError("Flower error 1: node unavailable", ErrorKind.NODE_UNAVAILABLE)})
    with pytest.raises(RuntimeError, match="only 1 of 2 site"):
        run_training_task(_job(tmp_path, False), caller, EventLog(tmp_path / "events.jsonl"))


def test_server_loop_asym_keeps_incompatible_layers(tmp_path: Path) -> None:
    from fednnunet.federation.events import EventLog
    from fednnunet.training.task import run_training_task

    shapes = {"1": {"enc": (2,), "head": (3,)}, "3": {"enc": (2,), "head": (5,), "deep": (1,)}}
    caller = _FakeCaller(shapes, {}, asym=True)
    run_training_task(_job(tmp_path, True, rounds=2), caller, EventLog(tmp_path / "events.jsonl"))
    got = caller.received[2]
    np.testing.assert_allclose(got["1"]["enc"], (1 * 2 + 3 * 6) / 4)  # averaged, weighted by cases
    np.testing.assert_allclose(got["3"]["enc"], (1 * 2 + 3 * 6) / 4)
    np.testing.assert_allclose(got["1"]["head"], 2.0)  # shapes differ: each keeps its own
    np.testing.assert_allclose(got["3"]["head"], 6.0)
    np.testing.assert_allclose(got["3"]["deep"], 6.0)
    assert not (tmp_path / "global").exists()


@pytest.mark.parametrize("tamper, reason", [
    (lambda u: {**u, "w": np.full_like(u["w"], np.nan)}, "non-finite values in 'w'"),
    (lambda u: {**u, "w": np.zeros(3, np.float32)}, "shape (3,)"),
    (lambda u: {**u, "evil": np.zeros(1, np.float32)}, "unexpected parameter 'evil'"),
    (lambda u: {**u, "w": u["w"].astype(np.float64)}, "dtype float64"),
])
def test_server_rejects_tampered_update_and_round_continues(tmp_path: Path, tamper, reason) -> None:
    from fednnunet.federation.events import EventLog
    from fednnunet.training.task import run_training_task

    class Tampering(_FakeCaller):
        def _replies(self, op, configs, arrays):
            replies, errors = super()._replies(op, configs, arrays)
            if op == "train_round" and configs["3"]["round"] == 2:
                info, update = replies["3"]
                replies["3"] = (info, tamper(update))
            return replies, errors

    caller = Tampering({"1": {"w": (2,)}, "3": {"w": (2,)}}, {})
    result = run_training_task(_job(tmp_path, False, min_sites=1), caller, EventLog(tmp_path / "events.jsonl"))
    events = (tmp_path / "events.jsonl").read_text()
    assert "round 2: site 3 left out: update rejected" in events and reason in events
    assert result["rounds"] == 3
    np.testing.assert_allclose(caller.received[3]["3"]["w"], 4.5)  # round 2's global = site 1's update alone


def test_killing_a_site_mid_run_does_not_stop_the_run(federation: Path, tmp_path: Path) -> None:
    """A real site process dies after round 1; with --min-sites 1 the others finish every round."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "fednnunet"), "run", "train", "901 902", "2d", "0", "--rounds", "4",
           "--iterations-per-round", "2", "--val-iterations", "1", "--min-sites", "1", "--skip-val",
           "--da-workers", "0", "--validate-delivered-every", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        # only this run's worker (a child of the launcher), never another federation's on this machine
        workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "fednnunet.site.main .*--site 902 "],
                                 capture_output=True, text=True).stdout.split()
        assert workers, "site 902's worker not found"
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout
    assert "site 902 left out" in stdout and "site 902 stopped" in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["rounds"] == 4 and "901" in result["sites"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(lines[-1]["sites"]) == ["901"]


def test_crash_of_the_whole_federation_then_resume(federation: Path, tmp_path: Path) -> None:
    """Kill `fednnunet run train` (server and sites) after round 2 of 4; `--resume` continues at round 3 and
    ends with 4 rounds, each logged once."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "fednnunet"), "run", "train", "901 902", "2d", "0", "--rounds", "4",
           "--iterations-per-round", "2", "--val-iterations", "1", "--skip-val", "--da-workers", "0",
           "--validate-delivered-every", "0", "--out", str(out)]
    # as in a terminal: a test run started in the background (`cmd &` in a script) inherits SIGINT ignored,
    # which Python keeps, and the Ctrl-C below would then do nothing
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.3)
        tree = descendants(proc.pid)  # SuperLink, SuperExecs, the ServerApp, SuperNodes, site workers
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the launcher stops every process it started
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    survivors = [pid for pid in tree if is_running(pid)]  # incl. the ServerApp, which runs in its own session
    assert not survivors, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in survivors]
    state = load_state(out)
    assert state is not None and 2 <= int(state["round"]) < 4
    crashed_at = int(state["round"])
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming after round {crashed_at} of 4" in res.stdout
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]
    assert json.loads((out / "result.json").read_text())["rounds"] == 4


def test_float16_transfer_halves_bytes_and_keeps_the_average(tmp_path: Path) -> None:
    from fednnunet.federation.events import EventLog
    from fednnunet.training.task import run_training_task

    shapes = {"1": {"w": (1000,)}, "3": {"w": (1000,)}}
    results = {}
    for dtype in ("float32", "float16"):
        caller = _FakeCaller(shapes, {})
        out = tmp_path / dtype
        run_training_task(_job(out, False, transfer_dtype=dtype), caller, EventLog(out / "events.jsonl"))
        results[dtype] = caller
        sent = caller.received[3]["1"]["w"]  # what a site received in round 3 (the fake transport counts no bytes)
        assert sent.dtype == np.dtype(dtype) and sent.nbytes == 1000 * np.dtype(dtype).itemsize
    np.testing.assert_allclose(results["float16"].received[3]["1"]["w"], results["float32"].received[3]["1"]["w"],
                               rtol=1e-3)
    saved = load_models(tmp_path / "float16", load_state(tmp_path / "float16"))["global"]["w"]
    assert saved.dtype == np.float32  # the server keeps the model in its own precision


@pytest.mark.parametrize("delta", [True, False])
def test_float16_transfer_keeps_changes_finer_than_float16(tmp_path: Path, delta: bool) -> None:
    """Weights at 1.0, where float16's step is 2**-10 (~1e-3); every round moves them by 1e-4. Sites reply the
    change (as real sites do): the global model gains 3e-4 in 3 rounds. Replying the weights themselves in
    float16 would round every round's progress away."""
    from fednnunet.federation.events import EventLog
    from fednnunet.training.task import run_training_task

    shapes = {"1": {"w": (4,)}, "3": {"w": (4,)}}
    caller = _FakeCaller(shapes, {}, step=1e-4, delta_dtype="float16" if delta else None)
    run_training_task(_job(tmp_path, False, transfer_dtype="float16"), caller, EventLog(tmp_path / "events.jsonl"))
    final = load_models(tmp_path, load_state(tmp_path))["global"]["w"]
    if delta:
        np.testing.assert_allclose(final, 1.0 + 3e-4, atol=1e-6)
    else:
        np.testing.assert_array_equal(final, 1.0)


# Last: it re-plans the shared federation with --asym, which the FFE tests above must not train on (FedAvg refuses
# sites whose plans differ).
def test_asym_training_end_to_end(federation: Path) -> None:
    """AsymFedAvg over real sites, with 16-bit transfer (sites reply changes; the server adds them to its copy)."""
    import torch

    assert _run_cli(["run", "plan_and_preprocess", "901 902", "-c", "2d", "--asym",
                     "--out", str(federation / "plan_asym")]) == 0
    out = federation / "train_asym"
    assert _run_cli(["run", "train", "901 902", "2d", "0", "--asym", "--skip-val", *TRAIN_FLAGS,
                     "--transfer-dtype", "float16", "--validate-delivered-every", "0", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["ok"] and result["rounds"] == 2 and "global_model" not in result
    for dataset in ("901", "902"):
        assert (_site_folder(federation, dataset) / "fold_0" / "checkpoint_final.pth").is_file()
        # no delivered-model validation: no best federated model, and no local one either
        assert not (_site_folder(federation, dataset) / "fold_0" / "checkpoint_best.pth").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    fractions = lines[-1]["asym_fraction_averaged"]
    assert set(fractions) == {"901", "902"} and all(0.0 < f <= 1.0 for f in fractions.values())
    for line in lines:  # half the model each way (plus the packed layout's alignment)
        for site, traffic in line["bytes"].items():
            half = line["model_bytes"][site] / 2
            assert half <= traffic["sent"] < 1.01 * half and half <= traffic["received"] < 1.01 * half
    for dataset in ("901", "902"):
        weights = _weights(_site_folder(federation, dataset) / "fold_0" / "checkpoint_final.pth")
        assert all(torch.isfinite(w).all() for w in weights.values())
