"""Tests of the persistent site trainer (fednnunet.training: site_trainer, weights, and the site worker's round).

The weight helpers are tested in this process on plain torch modules and on nnU-Net's network class from
dynamic_network_architectures (which does not import nnunetv2). Everything that touches nnunetv2 runs in
subprocesses: ``nnunetv2.paths`` reads nnUNet_raw/nnUNet_preprocessed/nnUNet_results once, at import, so a
pytest process that imported nnunetv2 with other paths would silently use the wrong folders.

The integration run (conftest's planned 2D synthetic site, 3 + 2 iterations per epoch, no augmentation
workers, its own results folder) is done once per module by a driver script that records what it saw in a JSON
report; the tests assert on it.
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BIN, own_run, run_logged, trainer_env
from conftest import PLANNED_SITE_ID as DATASET_ID
from fednnunet.training.weights import alias_map, load_unique_state, unique_state, unique_tensors, unwrap

# ----------------------------------------------------------------------------------------------- pure tests


class _Block(torch.nn.Module):
    """Mimics nnU-Net's ConvDropoutNormReLU: the same modules registered twice (``conv`` and ``all_modules``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.norm = torch.nn.InstanceNorm2d(2, affine=True)
        self.all_modules = torch.nn.Sequential(self.conv, self.norm)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)  # not in state_dict
        self.register_buffer("counter", torch.tensor(5, dtype=torch.long))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Block()
        self.decoder = torch.nn.Module()
        self.decoder.encoder = self.encoder  # alias of a whole sub-module, as nnU-Net's decoder.encoder
        self.head = torch.nn.Linear(4, 4, bias=False)
        self.tail = torch.nn.Linear(4, 4, bias=False)
        self.tail.weight = self.head.weight  # tied weight: one Parameter object under two names


def _plain_conv_unet() -> torch.nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, 4, (8, 16, 32, 32), torch.nn.Conv2d, 3, (1, 2, 2, 2), 2, 3, (2, 2, 2), conv_bias=True,
                         norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)


def test_unique_state_drops_aliases_keeps_first_key_and_copies() -> None:
    net = _Net()
    state = unique_state(net)
    # state_dict order: a module's own tensors (the buffer) before its children's
    assert list(state) == ["encoder.counter", "encoder.conv.weight", "encoder.conv.bias", "encoder.norm.weight",
                           "encoder.norm.bias", "head.weight"]
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert state["encoder.counter"].dtype == np.int64
    # copies, not views of the live tensors
    state["head.weight"][:] = 123.0
    assert not torch.any(net.head.weight == 123.0)


def test_unique_state_on_nnunet_network_covers_every_tensor_once() -> None:
    net = _plain_conv_unet()
    full = net.state_dict()
    unique = unique_tensors(net)
    assert len(unique) < len(full) / 2  # most keys of nnU-Net's state_dict are aliases
    assert set(unique) <= set(full)
    live_ptrs = {t.untyped_storage().data_ptr() for t in full.values()}
    assert {t.untyped_storage().data_ptr() for t in unique.values()} == live_ptrs
    assert all(not k.startswith("decoder.encoder.") and ".all_modules." not in k for k in unique)
    aliases = alias_map(net)
    assert list(aliases) == list(full) and set(aliases.values()) == set(unique)
    assert all(full[k].data_ptr() == unique[c].data_ptr() for k, c in aliases.items())
    first = "encoder.stages.0.0.convs.0.conv.weight"
    assert aliases["decoder.encoder.stages.0.0.convs.0.all_modules.0.weight"] == first


def test_load_unique_state_in_place_roundtrip_and_optimizer_kept() -> None:
    torch.manual_seed(0)
    net = _plain_conv_unet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.99)
    params_before = [id(p) for p in net.parameters()]
    original = unique_state(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    load_unique_state(net, original)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

    changed = {k: v + 1 for k, v in original.items()}
    load_unique_state(net, changed)
    # aliases see the new values too, because they are the same memory
    assert torch.equal(net.state_dict()["decoder.encoder.stages.0.0.convs.0.conv.weight"],
                       torch.from_numpy(changed["encoder.stages.0.0.convs.0.conv.weight"]))
    assert [id(p) for p in net.parameters()] == params_before
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == params_before


def test_load_unique_state_rejects_bad_payload_without_writing() -> None:
    net = _Net()
    good = unique_state(net)
    before = unique_state(net)

    missing = dict(good)
    del missing["encoder.norm.bias"]
    with pytest.raises(ValueError, match="encoder.norm.bias"):
        load_unique_state(net, missing)

    extra = {**good, "decoder.encoder.conv.weight": good["encoder.conv.weight"]}
    with pytest.raises(ValueError, match="decoder.encoder.conv.weight"):
        load_unique_state(net, extra)

    wrong_shape = {**{k: v + 1 for k, v in good.items()}, "head.weight": np.zeros((4, 5), np.float32)}
    with pytest.raises(ValueError, match="head.weight"):
        load_unique_state(net, wrong_shape)

    wrong_kind = {**good, "encoder.counter": np.array(1.5)}
    with pytest.raises(ValueError, match="encoder.counter"):
        load_unique_state(net, wrong_kind)

    after = unique_state(net)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_load_unique_state_accepts_read_only_arrays() -> None:
    net = _Net()
    arrays = {k: np.array(v + 1) for k, v in unique_state(net).items()}
    for v in arrays.values():
        v.flags.writeable = False
    load_unique_state(net, arrays)
    assert np.array_equal(unique_state(net)["head.weight"], arrays["head.weight"])


def test_unwrap_strips_compile_and_data_parallel() -> None:
    net = _Net()
    assert unwrap(net) is net
    assert unwrap(torch.nn.DataParallel(net)) is net
    compiled = torch.compile(net)
    assert unwrap(compiled) is net
    assert unwrap(torch.nn.DataParallel(compiled)) is net
    assert list(unique_state(compiled)) == list(unique_state(net))  # no _orig_mod. prefix


# ---------------------------------------------------------------------------------- integration with nnU-Net

_DRIVER = textwrap.dedent('''
    """Runs a SiteTrainer on a real site and records what it sees (run with the nnUNet_* env set)."""
    import json
    import sys
    import time

    import numpy as np
    import torch


    def max_abs_diff(a, b):
        return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


    def main(report_path):
        from fednnunet.training.site_trainer import SiteTrainer

        report = {"nnunet_imported_by_import": "nnunetv2" in sys.modules}
        kwargs = dict(dataset=DATASET_ID, configuration="2d", fold=0, device="cpu", total_epochs=3,
                      iterations_per_epoch=3, val_iterations=2, num_workers=0)
        start = time.perf_counter()
        st = SiteTrainer(seed=5, **kwargs)
        seed5_init = st.get_weights()
        report["build_seconds"] = st.build_seconds
        report["build_seconds_with_imports"] = time.perf_counter() - start
        report["output_folder"] = str(st.output_folder)

        net = st.network
        full = net.state_dict()
        weights = st.get_weights()
        report["n_state_dict_keys"] = len(full)
        report["n_unique_keys"] = len(weights)
        report["unique_keys_subset"] = set(weights) <= set(full)
        report["unique_covers_all_storages"] = (
            {t.untyped_storage().data_ptr() for t in full.values()}
            == {full[k].untyped_storage().data_ptr() for k in weights})

        # round trip leaves the network bit-identical, in place
        before = {k: v.clone() for k, v in full.items()}
        param_ids = [id(p) for p in net.parameters()]
        st.set_weights(weights)
        report["roundtrip_bit_identical"] = all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        report["params_same_objects"] = [id(p) for p in st.network.parameters()] == param_ids
        report["optimizer_same_params"] = [id(p) for p in st.trainer.optimizer.param_groups[0]["params"]] == param_ids

        # other weights change the forward output; restoring gives the original output back
        torch.manual_seed(0)
        x = torch.randn(1, 1, 64, 64)
        net.eval()
        with torch.no_grad():
            out0 = net(x)[0].clone()
            st.set_weights({k: v * np.asarray(1.1, v.dtype) if v.dtype.kind == "f" else v
                            for k, v in weights.items()})
            out1 = net(x)[0].clone()
            st.set_weights(weights)
            out2 = net(x)[0].clone()
        report["forward_changed"] = not torch.equal(out0, out1)
        report["forward_restored"] = torch.equal(out0, out2)
        try:
            st.set_weights({k: v for k, v in weights.items() if k != next(iter(weights))})
            report["missing_key_error"] = None
        except ValueError as e:
            report["missing_key_error"] = str(e)
        report["first_key"] = next(iter(weights))

        # two epochs
        metrics = []
        for _ in range(2):
            m = st.run_epoch()
            m["optimizer_lr"] = st.trainer.optimizer.param_groups[0]["lr"]
            metrics.append(m)
        report["metrics"] = metrics
        report["num_epochs"] = st.num_epochs
        report["current_epoch_after_2"] = st.current_epoch
        report["weights_changed_by_training"] = max_abs_diff(weights, st.get_weights()) > 0

        # save, then resume in a fresh trainer
        latest = st.save_latest()
        report["latest_path"] = str(latest)
        saved_weights = st.get_weights()
        st.close()
        st2 = SiteTrainer(continue_training=True, seed=5, **kwargs)
        report["resumed_epoch"] = st2.current_epoch
        report["resumed_weights_equal"] = max_abs_diff(saved_weights, st2.get_weights()) == 0.0
        report["resumed_logger_len"] = len(st2.trainer.logger.get_value("train_losses", step=None))
        m3 = st2.run_epoch()
        report["metrics_resumed"] = m3
        try:
            st2.run_epoch()
            report["past_end_error"] = None
        except RuntimeError as e:
            report["past_end_error"] = str(e)

        # finish with "aggregated" weights that differ from the local ones
        final = {k: v + np.asarray(0.001, v.dtype) if v.dtype.kind == "f" else v
                 for k, v in st2.get_weights().items()}
        np.savez(report_path + ".final.npz", **final)
        start = time.perf_counter()
        folder = st2.finish(final, validate=True)
        report["finish_seconds"] = time.perf_counter() - start
        report["finish_folder"] = str(folder)
        ckpt = torch.load(str(folder / "checkpoint_final.pth"), map_location="cpu", weights_only=False)
        report["ckpt_trainer_name"] = ckpt["trainer_name"]
        report["ckpt_current_epoch"] = ckpt["current_epoch"]
        report["ckpt_unique_equal_final"] = all(
            np.array_equal(ckpt["network_weights"][k].numpy(), v) for k, v in final.items())
        report["ckpt_keys_equal_state_dict"] = list(ckpt["network_weights"]) == list(full)
        report["ckpt_aliases_equal_final"] = np.array_equal(
            ckpt["network_weights"]["decoder.encoder.stages.0.0.convs.0.conv.weight"].numpy(),
            final["encoder.stages.0.0.convs.0.conv.weight"])
        try:
            st2.run_epoch()
            report["after_finish_error"] = None
        except RuntimeError as e:
            report["after_finish_error"] = str(e)

        # the final checkpoint as pretrained weights of a new training (fold "all": another folder)
        try:
            SiteTrainer(continue_training=True, pretrained_weights=str(folder / "checkpoint_final.pth"), **kwargs)
            report["both_error"] = None
        except RuntimeError as e:
            report["both_error"] = str(e)
        st3 = SiteTrainer(pretrained_weights=str(folder / "checkpoint_final.pth"), **{**kwargs, "fold": "all"})
        w3 = st3.get_weights()
        report["pretrained_folder"] = str(st3.output_folder)
        report["pretrained_epoch"] = st3.current_epoch
        report["pretrained_num_training_cases"] = st3.num_training_cases
        report["pretrained_equal_except_heads"] = all(
            np.array_equal(w3[k], v) for k, v in final.items() if ".seg_layers." not in k)
        report["pretrained_heads_not_loaded"] = any(  # nnU-Net never transfers the segmentation heads
            not np.array_equal(w3[k], v) for k, v in final.items() if ".seg_layers." in k)
        st3.close()

        # the same seed, the same initial network; another seed, another one
        seed_checks_started = time.perf_counter()
        for seed, key in ((5, "seed_same_init"), (6, "seed_other_init_differs")):
            st4 = SiteTrainer(seed=seed, **kwargs)
            report[key] = (max_abs_diff(seed5_init, st4.get_weights()) == 0.0) == (seed == 5)
            st4.close()
        report["seed_checks_seconds"] = time.perf_counter() - seed_checks_started
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)


    if __name__ == "__main__":  # nnU-Net starts worker processes with spawn, which re-imports this file
        main(sys.argv[1])
''').replace("DATASET_ID", str(DATASET_ID))


@pytest.fixture(scope="module")
def site_run(planned_site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("site")
    env = trainer_env(planned_site, root / "results")
    driver = root / "driver.py"
    driver.write_text(_DRIVER)
    report_path = root / "report.json"
    run_logged([sys.executable, str(driver), str(report_path)], env, root / "driver.log", timeout=900)
    report = json.loads(report_path.read_text())
    report["root"] = str(root)
    report["raw"] = env["nnUNet_raw"]
    report["env"] = env
    return report


def test_importing_site_trainer_does_not_import_nnunet(site_run: dict) -> None:
    """nnunetv2.paths freezes the nnUNet_* variables at import; importing our module must not trigger that."""
    assert site_run["nnunet_imported_by_import"] is False


def test_weights_are_unique_and_roundtrip_exactly(site_run: dict) -> None:
    r = site_run
    assert r["n_unique_keys"] < r["n_state_dict_keys"] / 2, (r["n_unique_keys"], r["n_state_dict_keys"])
    assert r["unique_keys_subset"] and r["unique_covers_all_storages"]
    assert r["roundtrip_bit_identical"]
    assert r["params_same_objects"] and r["optimizer_same_params"]
    assert r["forward_changed"] and r["forward_restored"]
    assert r["missing_key_error"] is not None and r["first_key"] in r["missing_key_error"]


def test_run_epoch_metrics_epoch_counter_and_poly_lr(site_run: dict) -> None:
    r = site_run
    assert r["num_epochs"] == 3
    assert [m["epoch"] for m in r["metrics"]] == [1, 2]
    assert r["current_epoch_after_2"] == 2
    assert r["weights_changed_by_training"]
    for epoch, m in enumerate(r["metrics"] + [r["metrics_resumed"]]):
        assert isinstance(m["train_loss"], float) and np.isfinite(m["train_loss"])
        assert isinstance(m["val_loss"], float) and np.isfinite(m["val_loss"])
        assert isinstance(m["pseudo_dice"], list) and len(m["pseudo_dice"]) == 2  # ring, core
        assert all(isinstance(d, float) for d in m["pseudo_dice"])
        assert isinstance(m["num_training_cases"], int) and m["num_training_cases"] > 0
        assert isinstance(m["epoch_seconds"], float) and m["epoch_seconds"] > 0
        assert isinstance(m["epoch"], int)
        expected_lr = 0.01 * (1 - epoch / 3) ** 0.9  # nnU-Net's PolyLRScheduler at current_epoch
        assert m["lr"] == pytest.approx(expected_lr, rel=1e-12)
        if "optimizer_lr" in m:
            assert m["optimizer_lr"] == pytest.approx(expected_lr, rel=1e-12)


def test_the_seed_decides_the_initial_network(site_run: dict) -> None:
    """A trainer built later in the same process with the same seed starts from the same network, with another seed
    from another one (that the same seed repeats a whole federated run bit for bit, through a resume, is
    test_training.py's test_seeded_run_repeated_through_a_resume_is_bit_for_bit_the_same)."""
    assert site_run["seed_same_init"] and site_run["seed_other_init_differs"]


def test_save_latest_and_resume(site_run: dict) -> None:
    r = site_run
    assert r["latest_path"].endswith("fold_0/checkpoint_latest.pth")
    assert r["resumed_epoch"] == 2
    assert r["resumed_weights_equal"]
    assert r["resumed_logger_len"] == 2
    assert r["metrics_resumed"]["epoch"] == 3
    assert r["past_end_error"] is not None and "epochs are done" in r["past_end_error"]


def test_finish_writes_ordinary_nnunet_results_folder(site_run: dict) -> None:
    r = site_run
    fold = Path(r["finish_folder"])
    assert fold == Path(r["output_folder"])
    assert fold.name == "fold_0" and fold.parent.name == "nnUNetTrainer__nnUNetPlans__2d"
    assert fold.parent.parent.parent == Path(r["root"]) / "results"
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (fold.parent / name).is_file(), name
    assert (fold / "checkpoint_final.pth").is_file()
    assert not (fold / "checkpoint_latest.pth").exists()  # nnU-Net removes it on a finished training
    assert (fold / "validation" / "summary.json").is_file()
    assert r["ckpt_trainer_name"] == "nnUNetTrainer"
    assert r["ckpt_current_epoch"] == 3
    assert r["ckpt_unique_equal_final"] and r["ckpt_aliases_equal_final"] and r["ckpt_keys_equal_state_dict"]
    assert r["after_finish_error"] is not None


def test_pretrained_weights_and_fold_all(site_run: dict) -> None:
    r = site_run
    assert r["both_error"] is not None and "mutually exclusive" in r["both_error"]
    assert r["pretrained_folder"].endswith("nnUNetTrainer__nnUNetPlans__2d/fold_all")
    assert r["pretrained_epoch"] == 0
    raw = next(Path(r["raw"]).glob(f"Dataset{DATASET_ID}_*"))
    assert r["pretrained_num_training_cases"] == len(list((raw / "labelsTr").glob("*.nii.gz")))  # every case
    assert r["metrics"][0]["num_training_cases"] < r["pretrained_num_training_cases"]  # fold 0: 4/5 of them
    assert r["pretrained_equal_except_heads"] and r["pretrained_heads_not_loaded"]


def test_nnunet_predict_uses_the_site_folder_as_is(site_run: dict) -> None:
    root = Path(site_run["root"])
    raw = next(Path(site_run["raw"]).glob(f"Dataset{DATASET_ID}_*"))
    images = sorted((raw / "imagesTr").glob("*_0000.nii.gz"))[:2]
    subset = root / "predict_in"
    subset.mkdir()
    for image in images:
        (subset / image.name).symlink_to(image)
    out = root / "predict_out"
    run_logged([str(BIN / "nnUNetv2_predict"), "-i", str(subset), "-o", str(out), "-d", str(DATASET_ID), "-c", "2d",
                "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
               site_run["env"], root / "predict.log", timeout=600)
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == sorted(i.name.replace("_0000.nii.gz", ".nii.gz") for i in images)


# ------------------------------------------------------------------------- the site worker around a round


def test_worker_checkpoints_after_the_reply_and_finishes_it_on_sigterm(planned_site: Path, tmp_path: Path) -> None:
    """A round's reply does not wait for ``checkpoint_latest.pth``: the worker writes it after pushing the reply.
    A SIGTERM right after the reply reached the server leaves a complete checkpoint (that the signal waits for a
    write in progress is shown in test_site_worker). A worker resumed from that checkpoint and asked for a later
    round than it holds (it missed round 2) trains that round's epoch, from the model it received, with that
    epoch's learning rate. Real SuperLink, SuperNode and worker."""
    from fednnunet.flower.site_caller import FlowerSiteCaller
    from fednnunet.federation.local import Site, SiteNode
    from fednnunet.federation.server_node import ServerNode
    from fednnunet.protocol.messages import TrainInit, TrainRound

    env = trainer_env(planned_site, tmp_path / "results")
    init_request = TrainInit(configuration="2d", fold="0", trainer="nnUNetTrainer", plans="nnUNetPlans", device="cpu",
                             npz=False, continue_training=False, pretrained_weights=None, val_best=False,
                             disable_checkpointing=False, rounds=3, iterations_per_round=2, val_iterations=1,
                             epochs_per_round=1, da_workers=0, transfer_dtype="float32", seed=None, momentum="local")
    with ServerNode(tmp_path / "server") as server, own_run(server) as grid:
        caller = FlowerSiteCaller(grid)
        with SiteNode(tmp_path / "site", Site("901", str(DATASET_ID)), server.site_address, env) as node:
            caller.wait_for_nodes(1, 120)
            [(init, weights)] = caller.broadcast(init_request).values()
            [(reply, update)] = caller.call({"901": TrainRound(round=1, epoch_end=1, validate_delivered=False)},
                                            {"901": weights}).values()
            node.worker.popen.send_signal(signal.SIGTERM)
            assert reply.metrics["epoch"] == 1 and update, reply
            assert node.worker.popen.wait(timeout=120) == -signal.SIGTERM
        latest = Path(init.output_folder) / "checkpoint_latest.pth"
        assert latest.is_file(), (tmp_path / "site" / "logs" / "worker-901.log").read_text()[-3000:]
        assert torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"] == 1

        old_nodes = set(grid.get_node_ids())  # Flower lists the stopped node as online for a while
        with SiteNode(tmp_path / "site2", Site("901", str(DATASET_ID)), server.site_address, env):
            deadline = time.monotonic() + 120
            while not (new := set(grid.get_node_ids()) - old_nodes) and time.monotonic() < deadline:
                time.sleep(0.5)
            caller.node_of = {"901": new.pop()}  # the site came back as a new node
            [(info, weights)] = caller.broadcast(replace(init_request, continue_training=True)).values()
            assert info.current_epoch == 1, info
            [(reply, _)] = caller.call({"901": TrainRound(round=3, epoch_end=3, validate_delivered=False)},
                                       {"901": weights}).values()
            metrics = reply.metrics
            assert metrics["epoch"] == 3 and metrics["epochs"] == 1 and metrics["skipped_epochs"] == 1, metrics
            assert abs(metrics["lr"] - 0.01 * (1 - 2 / 3) ** 0.9) < 1e-9, metrics  # nnU-Net's poly LR at epoch 2
