"""The benchmark protocol: split bookkeeping (fast) and ``run_benchmark`` end to end on two built-in synthetic 2D
sites at a minimal budget (methods local and FFE, fold 0, 2 rounds of 2 iterations).

The end-to-end run costs about 3 minutes on an idle 2-core CPU (5+ minutes when the machine is busy): stock planning
of two sites, two tiny trainers, two one-round federations (plan_and_preprocess, train; SuperLink, SuperNodes and
site workers start-up dominates) and two prediction workers. Centralized and AsymFedAvg are left out of the test to
stay in that budget (each adds 1-2 minutes); they run the same code paths as local (centralized: stock planning +
SiteTrainer) and FFE (asym: ``--asym``). All four methods were run by hand on the same synthetic sites (plus a third
as external site), and local/FFE/centralized on real data (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fednnunet.evaluation.benchmark import format_progress, pooled_splits, resolve_sites, run_benchmark, site_splits
from fednnunet.data.synthetic import write_demo_federation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_raw")
    write_demo_federation(root, first_id=901, sites=2, dim=2, seed=0)
    return root


def test_splits_are_nnunets_and_pooled_is_the_union(raw: Path) -> None:
    sites = resolve_sites(raw, ["901", "Dataset902_SiteB"])
    assert [s.key for s in sites] == ["SiteA", "SiteB"]
    splits = {s.id: site_splits(s.folder) for s in sites}
    for s in sites:
        sp = splits[s.id]
        assert len(sp) == 5
        cases = sorted(c for f in sp for c in f["val"])
        assert cases == sorted({c for f in sp for c in f["train"] + f["val"]})  # every case held out exactly once
        for f in sp:
            assert not set(f["train"]) & set(f["val"])
    pooled = pooled_splits(splits)
    for n, fold in enumerate(pooled):
        assert fold["val"] == sorted(f"s{i}_{c}" for i in splits for c in splits[i][n]["val"])
        assert fold["train"] == sorted(f"s{i}_{c}" for i in splits for c in splits[i][n]["train"])


def test_progress_line() -> None:
    line = format_progress({"method": "ffe", "fold": 0, "round": "2/10", "site": "", "message": "x",
                            "elapsed": 75, "eta": 3605})
    assert line == "[1m15s | ETA 1h00m] ffe fold 0 round 2/10: x"


def test_cli_parses_the_commands() -> None:
    from fednnunet.cli import build_parser

    a = build_parser().parse_args(["benchmark", "901 902", "-c", "2d", "--external", "903", "--folds", "0 1",
                                   "--rounds", "3", "--iterations-per-round", "5", "--methods", "local,ffe",
                                   "--repeats", "3", "--seed", "10", "--finetune-epochs", "2", "--out", "x"])
    assert (a.sites, a.external, a.folds, a.rounds, a.iterations_per_round, a.methods, a.repeats, a.seed,
            a.finetune_epochs) == ("901 902", "903", "0 1", 3, 5, "local,ffe", 3, 10, 2)
    a = build_parser().parse_args(["evaluate", "-d", "901", "-c", "2d", "-f", "0 1", "--out", "x"])
    assert a.f == ["0 1"]
    a = build_parser().parse_args(["convert", "retina-vessels", "src", "--out", "r", "--first-id", "201",
                                   "--downsample", "4"])
    assert (a.collection, a.first_id, a.downsample) == ("retina-vessels", 201, 4)


@pytest.mark.long  # 2 min; the methods' steps are unit-tested here (splits, variants, ffe-ft's prediction jobs)
def test_benchmark_end_to_end(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fednnunet.evaluation.report import evaluate_predictions

    # the README's environment: stock nnU-Net planning (local) must not die on torch.set_num_threads(0)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    events: list[dict] = []
    out = tmp_path / "bench"
    results = run_benchmark(raw, ["901", "902"], "2d", out, folds=[0], rounds=2, iterations_per_round=2,
                            methods=("local", "ffe"), progress=events.append, seed=3)

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"].keys() == {"local", "ffe"}
    assert on_disk["command"] and on_disk["budget"]["rounds"] == 2 and on_disk["budget"]["iterations_per_round"] == 2
    splits = {s.key: site_splits(s.folder)[0]["val"] for s in resolve_sites(raw, ["901", "902"])}
    for method, per_site in on_disk["methods"].items():
        assert per_site.keys() == {"SiteA", "SiteB"}
        for site, entry in per_site.items():
            assert {"dsc", "hd95", "cases", "per_case"} <= entry.keys()
            assert entry["cases"] == len(entry["per_case"]) == len(splits[site])
            assert sorted(c["case"] for c in entry["per_case"]) == sorted(splits[site])  # fold 0's held-out cases
            assert 0.0 <= entry["dsc"] <= 1.0 and math.isfinite(entry["hd95"]) and entry["hd95"] >= 0
            # an independent evaluation of the saved predictions gives the same numbers
            d = resolve_sites(raw, [site])[0]
            again = evaluate_predictions(out / method / "repeat_0" / "predictions" / site, d.folder / "labelsTr",
                                         d.folder / "dataset.json")
            assert again["dsc"] == pytest.approx(entry["dsc"]) and again["hd95"] == pytest.approx(entry["hd95"])
    assert "ffe_vs_local" in on_disk["wilcoxon"]
    assert on_disk["wilcoxon"]["ffe_vs_local"]["sites"]["SiteA"]["n"] == len(splits["SiteA"])
    assert results["methods"]["ffe"]["SiteA"]["dsc"] == pytest.approx(on_disk["methods"]["ffe"]["SiteA"]["dsc"])
    # one repeat, seeded: kept as scored, and the paired interval of FFE vs local over the cases
    assert [r["seed"] for r in on_disk["repeats"]] == [3] and on_disk["budget"]["seeds"] == [3]
    interval = on_disk["intervals"]["ffe_vs_local"]["sites"]["SiteA"]
    assert interval["n_repeats"] == 1 and interval["ci_low"] <= interval["mean_diff"] <= interval["ci_high"]

    # what averaging cost each site: FFE's delivered model of round 2 against the local models of round 1
    gap = on_disk["averaging_gap"]
    assert set(gap) == {"ffe"} and set(gap["ffe"]) == {"SiteA", "SiteB"}
    assert all(e["rounds"] == [1] and math.isfinite(e["gap"]) for e in gap["ffe"].values())
    md = (out / "results.md").read_text()
    assert "| Method | SiteA | SiteB |" in md and "| Local |" in md and "| FFE |" in md and "Wilcoxon" in md
    assert "| FFE − Local |" in md and "## What averaging costs each site" in md
    for png in ("dsc.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    # each method had its own nnU-Net roots: ordinary results folders in both
    for method in ("local", "ffe"):
        assert (out / method / "repeat_0" / "nnUNet_results" / "Dataset901_SiteA" / "nnUNetTrainer__nnUNetPlans__2d"
                / "fold_0" / "checkpoint_final.pth").is_file()
    # progress: method, site, fold and round, with a time estimate
    assert any(e["method"] == "ffe" and e["round"] == "2/2" and e["fold"] == 0 for e in events)
    assert any(e["method"] == "local" and e["site"] == "SiteB" and e["round"] == "2/2" for e in events)
    assert all("elapsed" in e and "eta" in e for e in events)


def test_ffe_variants_are_checked_before_anything_runs(raw: Path, tmp_path: Path) -> None:
    from fednnunet.evaluation.benchmark import FFE_VARIANTS, BenchmarkError

    assert FFE_VARIANTS["ffe-often"] == ((), 5) and FFE_VARIANTS["ffe-uniform"][0] == ("--weighting", "uniform")
    with pytest.raises(BenchmarkError, match=r"ffe-often averages 5 x as often: iterations_per_round \(12\) must be a "
                                             r"multiple of 5"):
        run_benchmark(raw, ["901", "902"], "2d", tmp_path / "b", rounds=1, iterations_per_round=12,
                      methods=("ffe", "ffe-often"))
    with pytest.raises(BenchmarkError, match="choose from local, centralized, ffe, asym, ffe16, ffe-uniform, ffe-often, "
                                             "ffe-mom-reset, ffe-mom-avg, ffe-server-mom"):
        run_benchmark(raw, ["901", "902"], "2d", tmp_path / "b", methods=("ffe-fast",))
    with pytest.raises(BenchmarkError, match="ffe-clip needs its bound"):
        run_benchmark(raw, ["901", "902"], "2d", tmp_path / "b", methods=("ffe", "ffe-clip"))
    with pytest.raises(BenchmarkError, match="ffe-ft/ffe-bn-ft: finetune_epochs must be >= 1"):
        run_benchmark(raw, ["901", "902"], "2d", tmp_path / "b", methods=("ffe-ft",), finetune_epochs=0)
    assert not (tmp_path / "b").exists()


def test_ffe_ft_predicts_internal_sites_with_their_personal_models(raw: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``ffe-ft`` trains as FFE with ``--finetune-epochs E``; every internal site's held-out cases are predicted by
    its own personal model (``nnUNetPlans_personal``, the same fold), the external site by the global model."""
    from fednnunet.evaluation.benchmark import _Context

    internal, ext = resolve_sites(raw, ["901"]), resolve_sites(raw, ["902"])
    ctx = _Context(raw, tmp_path, "2d", internal, ext, [0], 4, 2, 1, {d.id: site_splits(d.folder) for d in internal},
                   lambda *a, **k: None)
    ctx.finetune_epochs = 3
    trained: list[tuple] = []
    jobs: list[dict] = []
    monkeypatch.setattr(ctx, "_train_federated", lambda *a: trained.append(a) or tmp_path / "metrics.jsonl")
    monkeypatch.setattr(ctx, "_predict", lambda method, env, j: jobs.extend(j))
    monkeypatch.setattr(ctx, "_evaluate", lambda pred_dir, d: [])
    ctx.run("ffe-ft")
    assert trained[0][0] == "ffe-ft" and trained[0][3] == ("--finetune-epochs", "3")
    results = tmp_path / "ffe-ft" / "repeat_0" / "nnUNet_results"
    own, outside = (j for j in jobs if j["site"] == "SiteA"), (j for j in jobs if j["site"] == "SiteB")
    job = next(own)
    assert job["model_folder"] == str(results / "Dataset901_SiteA" / "nnUNetTrainer__nnUNetPlans_personal__2d")
    assert job["folds"] == [0] and len(job["cases"]) == len(site_splits(internal[0].folder)[0]["val"])
    # the coordinator's global model: each fold's, linked into one model folder
    global_model = tmp_path / "ffe-ft" / "repeat_0" / "global_model" / "nnUNetTrainer__nnUNetPlans__2d"
    assert next(outside)["model_folder"] == str(global_model)
    assert (global_model / "fold_0").readlink() == (tmp_path / "ffe-ft" / "repeat_0" / "runs" / "fold_0" / "global" /
                                                    "nnUNetTrainer__nnUNetPlans__2d" / "fold_0")

    jobs.clear()
    ctx.run("ffe-bn-ft")  # with --local-norm too
    assert trained[1][0] == "ffe-bn-ft" and trained[1][3] == ("--local-norm", "--finetune-epochs", "3")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_step_is_stopped_with_the_benchmark(tmp_path: Path, how: str) -> None:
    """A benchmark step (e.g. ``fednnunet run train``, which owns a SuperLink, SuperNodes and workers) gets SIGTERM,
    so that it stops its processes, when the benchmark is killed (the kernel sends it) or interrupted."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    child = tmp_path / "step.py"
    child.write_text(textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        def stop(signum, frame):
            Path({str(tmp_path / 'stopped')!r}).write_text(str(signum))
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("started", flush=True)
        time.sleep(120)
    """))
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, sys
        from fednnunet.evaluation.benchmark import _stream
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a Ctrl-C, also where the tests run in background
        _stream([sys.executable, {str(child)!r}], dict(os.environ), "step", lambda line: print(line, flush=True))
    """)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "started"
    parent.send_signal(getattr(signal, how))
    deadline = time.monotonic() + 20
    while not (tmp_path / "stopped").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    parent.wait(timeout=30)
    assert (tmp_path / "stopped").read_text() == str(int(signal.SIGTERM))
