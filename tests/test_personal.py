"""Personal site models (issue 28, item 1: ``--finetune-epochs N``): every site fine-tunes the federation's final
model on its own training cases into an ordinary nnU-Net model of plans ``<plans>_personal``, beside the global one.

Pure checks of the new request and reply fields and of the coordinator's reading of them (fake sites), then one real
one-machine federation of two synthetic 2D sites (the planned federation of test_training.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fednnunet.protocol.codec import WireError
from fednnunet.protocol.envelope import read_reply, read_request
from fednnunet.protocol.errors import ErrorKind, SiteError
from fednnunet.protocol.messages import TrainFinish, TrainFinishReply
from fednnunet.training.options import TrainOptions
from test_training import TRAIN_FLAGS, _FakeCaller, _job, _run_cli, _weights, federation  # noqa: F401

PERSONAL = "nnUNetTrainer__nnUNetPlans_personal__2d"
GLOBAL = "nnUNetTrainer__nnUNetPlans__2d"


# --- pure ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, words", [(-1, "finetune_epochs must be non-negative"),
                                          *((v, "finetune_epochs: expected an integer") for v in (True, "2", 1.5))])
def test_train_finish_refuses_a_bad_finetune_epochs(value, words: str) -> None:
    config = {"validate": True, "val_best": False, "best": None, "finetune_epochs": value}
    with pytest.raises(WireError, match=words):
        read_request({"op": "train_finish", "config": config})
    assert read_request({"op": "train_finish", "config": {**config, "finetune_epochs": 3}})[0].finetune_epochs == 3
    del config["finetune_epochs"]  # a coordinator that asks for none need not say so
    assert read_request({"op": "train_finish", "config": config})[0].finetune_epochs == 0


def test_train_finish_reply_reads_the_personal_model_and_refuses_a_malformed_one() -> None:
    base = {"output_folder": "o", "checkpoint": "c"}
    personal = {"output_folder": "p", "checkpoint": "p/checkpoint_final.pth", "epochs": 2,
                "validation_mean_dice": 0.5}
    reply = read_reply(TrainFinish, {"ok": True, "result": {**base, "personal": personal}}, "h1")
    assert isinstance(reply, TrainFinishReply) and reply.personal is not None
    assert reply.personal.epochs == 2 and reply.personal.validation_sums is None
    assert read_reply(TrainFinish, {"ok": True, "result": base}, "h1").personal is None
    for bad, words in [({**personal, "epochs": "2"}, "personal: epochs"), ({**personal, "path": "/etc"}, "unknown"),
                       ({"output_folder": "p", "epochs": 2}, "missing field checkpoint"), ([personal], "object")]:
        error = read_reply(TrainFinish, {"ok": True, "result": {**base, "personal": bad}}, "h1")
        assert isinstance(error, SiteError) and error.kind is ErrorKind.MALFORMED_REPLY and words in error, error


def test_finetune_options() -> None:
    assert TrainOptions(rounds=1).finetune_epochs == 0
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="finetune_epochs"):
            TrainOptions(rounds=1, finetune_epochs=bad)
    for other in ({"disable_checkpointing": True}, {"validation_only": True}):
        with pytest.raises(ValueError, match="--finetune-epochs"):
            TrainOptions(rounds=1, finetune_epochs=2, **other)
    with pytest.raises(ValueError, match="plans"):  # the personal plans name must still be a plain identifier
        TrainOptions(rounds=1, finetune_epochs=2, plans="p" * 195)


class _PersonalSites(_FakeCaller):
    """Fake sites that fine-tune when asked (``answer``: whether they reply a personal model)."""

    def __init__(self, answer: bool) -> None:
        super().__init__({"1": {"w": (2,)}, "3": {"w": (2,)}}, {})
        self.answer = answer
        self.finish_configs: list[dict] = []

    def _replies(self, op, configs, arrays):
        replies, errors = super()._replies(op, configs, arrays)
        if op == "train_finish":
            self.finish_configs.extend(configs.values())
            for site, (reply, out) in replies.items():
                if self.answer:
                    reply["personal"] = {"output_folder": f"/results/{site}/personal", "epochs": 2,
                                         "checkpoint": f"/results/{site}/personal/checkpoint_final.pth"}
        return replies, errors


def test_coordinator_asks_for_personal_models_and_records_them(tmp_path: Path) -> None:
    from fednnunet.federation.events import EventLog
    from fednnunet.training.task import run_training_task

    caller = _PersonalSites(answer=True)
    result = run_training_task(_job(tmp_path, False, finetune_epochs=2), caller, EventLog(tmp_path / "events.jsonl"))
    assert [c["finetune_epochs"] for c in caller.finish_configs] == [2, 2]
    assert result["sites"]["3"]["personal"]["output_folder"] == "/results/3/personal"
    assert "personal model (2 epoch(s) on its own cases) in /results/1/personal" in \
        (tmp_path / "events.jsonl").read_text()

    # a site that does not deliver the personal model it was asked for has not finished
    with pytest.raises(RuntimeError, match="lacks the personal model it was asked for"):
        run_training_task(_job(tmp_path / "b", False, finetune_epochs=2), _PersonalSites(answer=False),
                          EventLog(tmp_path / "b.jsonl"))


# --- end to end ----------------------------------------------------------------------------------------------
def _folder(root: Path, dataset: str, model: str) -> Path:
    (folder,) = (root / "nnUNet_results").glob(f"Dataset{dataset}_*/{model}/fold_0")
    return folder


def test_every_site_gets_a_personal_model_beside_the_global_one(federation: Path, tmp_path: Path,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded 2-round FFE run with ``--finetune-epochs 2``: every site writes its personal model in its own nnU-Net
    folder (validated on its fold), the global model stays the coordinator's, ``find_best_configuration -p
    nnUNetPlans nnUNetPlans_personal`` scores both, stock ``nnUNetv2_predict -p nnUNetPlans_personal`` predicts with
    it, and the seeded repeat gives the same personal weights bit for bit."""
    import torch

    monkeypatch.setenv("nnUNet_def_n_proc", "1")  # the final validations' export pools: one worker, not eight

    out = federation / "personal"
    flags = ["run", "train", "901 902", "2d", "0", *TRAIN_FLAGS, "--seed", "0", "--finetune-epochs", "2"]
    assert _run_cli([*flags, "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    glob = _weights(out / "global" / GLOBAL / "fold_0" / "checkpoint_final.pth")
    personal = {}
    for dataset in ("901", "902"):
        site = result["sites"][dataset]
        folder = _folder(federation, dataset, PERSONAL)
        assert site["personal"]["output_folder"] == str(folder) and site["personal"]["epochs"] == 2
        assert 0.0 <= site["personal"]["validation_mean_dice"] <= 1.0
        assert (folder / "validation" / "summary.json").is_file()
        assert (folder / "checkpoint_best.pth").is_file()  # nnU-Net's own, by the fine-tuning's EMA pseudo-Dice
        ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        personal[dataset] = ckpt["network_weights"]
        # the fine-tuning: nnU-Net's poly schedule over its own 2 epochs, from a tenth of nnU-Net's 1e-2, and the
        # run's iterations per epoch
        assert ckpt["current_epoch"] == 2 and ckpt["trainer_name"] == "nnUNetTrainer"
        assert ckpt["logging"]["lrs"] == pytest.approx([1e-3, 1e-3 * 0.5 ** 0.9])
        assert json.loads((folder / "debug.json").read_text())["num_iterations_per_epoch"] == "2"
        plans = json.loads((folder.parent / "plans.json").read_text())
        preprocessed = next((federation / "nnUNet_preprocessed").glob(f"Dataset{dataset}_*"))
        stock = json.loads((preprocessed / "nnUNetPlans.json").read_text())
        assert plans["plans_name"] == "nnUNetPlans_personal"
        assert plans["configurations"]["2d"]["data_identifier"] == stock["configurations"]["2d"]["data_identifier"]
        # the global model at the site is the coordinator's, untouched by the fine-tuning
        site_global = _weights(_folder(federation, dataset, GLOBAL) / "checkpoint_final.pth")
        assert all(torch.equal(site_global[k], glob[k]) for k in glob)
        assert not all(torch.equal(personal[dataset][k], glob[k]) for k in glob)
    assert not all(torch.equal(personal["901"][k], personal["902"][k]) for k in glob)  # each its own
    rows = json.loads((out / "cross_validation.json").read_text())["rows"]
    assert list(rows) == ["fold 0", "fold 0 personal"]
    assert rows["fold 0 personal"]["pooled"]["num_cases"] == rows["fold 0"]["pooled"]["num_cases"] > 0
    assert "personal model (2 epoch(s) on its own cases)" in (out / "events.jsonl").read_text()

    # find_best_configuration sees it as one more model (ensembles would need --npz)
    best = federation / "personal_best"
    assert _run_cli(["run", "find_best_configuration", "901 902", "-c", "2d", "-f", "0", "-p", "nnUNetPlans",
                     "nnUNetPlans_personal", "--disable_ensembling", "--out", str(best)]) == 0
    scored = json.loads((best / "cross_validation.json").read_text())["rows"]
    assert set(scored) == {GLOBAL, PERSONAL}
    assert scored[PERSONAL]["pooled"] == rows["fold 0 personal"]["pooled"]

    # stock nnU-Net predicts with the personal model by its plans name
    images = next((federation / "nnUNet_raw").glob("Dataset901_*")) / "imagesTr"
    inp = tmp_path / "in"
    inp.mkdir()
    case = sorted(images.iterdir())[0]
    (inp / case.name).write_bytes(case.read_bytes())
    predict = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inp), "-o", str(tmp_path / "pred"),
               "-d", "901", "-c", "2d", "-f", "0", "-p", "nnUNetPlans_personal", "-device", "cpu", "--disable_tta",
               "-npp", "1", "-nps", "1"]
    proc = subprocess.run(predict, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1

    # the seeded repeat (without the final validations): the same personal models bit for bit
    assert _run_cli([*flags, "--skip-val", "--out", str(federation / "personal_repeat")]) == 0
    for dataset in ("901", "902"):
        again = _weights(_folder(federation, dataset, PERSONAL) / "checkpoint_final.pth")
        assert all(torch.equal(again[k], personal[dataset][k]) for k in again), dataset


def test_local_norm_keeps_every_sites_normalization(federation: Path) -> None:  # noqa: F811
    """``--local-norm`` (FedBN, issue 28 item 2) on the real federation, 2 seeded rounds: each site's final model is
    the global model with its own normalization layers (every InstanceNorm weight and bias of nnU-Net's network, and
    nothing else, differs), and the coordinator's global model has the averaged normalization."""
    import torch

    out = federation / "local_norm"
    assert _run_cli(["run", "train", "901 902", "2d", "0", *TRAIN_FLAGS, "--seed", "0", "--skip-val", "--local-norm",
                     "--out", str(out)]) == 0
    glob = _weights(out / "global" / GLOBAL / "fold_0" / "checkpoint_final.pth")
    own = {d: _weights(_folder(federation, d, GLOBAL) / "checkpoint_final.pth") for d in ("901", "902")}
    # nnU-Net's InstanceNorm layers by their checkpoint names: "...norm.weight" and the aliases that share its
    # storage in the checkpoint ("...all_modules.1.weight")
    storage = {k: t.untyped_storage().data_ptr() for k, t in glob.items()}
    norm_storage = {storage[k] for k in glob if ".norm." in k}
    norm = {k for k in glob if storage[k] in norm_storage}
    assert len(norm) > len(norm_storage) > 0 and all(k.endswith((".weight", ".bias")) for k in norm)
    for k in glob:
        same = [torch.equal(own[d][k], glob[k]) for d in own]
        assert same == ([False, False] if k in norm else [True, True]), k
    assert all(not torch.equal(own["901"][k], own["902"][k]) for k in norm)
    assert "FedBN (normalization layers kept at the sites)" in (out / "events.jsonl").read_text()
