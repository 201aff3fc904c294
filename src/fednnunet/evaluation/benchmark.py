"""The paper's evaluation protocol as one function: local, centralized, FFE and AsymFedAvg training on the same
splits with the same budget, cross-validated on the internal sites and ensembled on external sites.

Layout of ``out`` (every method has its own nnU-Net roots, because every method writes models into the same
site dataset names; the raw data are shared)::

    out/<method>/nnUNet_preprocessed/   plans, preprocessed data, splits_final.json (shared by the repeats)
    out/<method>/repeat_K/              one training repeat (K = 0 .. repeats - 1, seed + K):
        nnUNet_results/                 ordinary nnU-Net results folders (one per site; one pooled for centralized)
        runs/fold_X/                    metrics.jsonl (per round, per site), federation logs (ffe, asym)
        predictions/<site>/             cross-validation predictions of the site's held-out cases (all folds)
        predictions/external/<site>/<model site>/   fold-ensemble predictions of an external site
    out/centralized/nnUNet_raw/         links to the site datasets plus the pooled dataset (cases ``s<id>_<case>``)
    out/results.json, results.md, dsc.png, training_curves.png

Methods:

* ``local``: stock ``nnUNetv2_plan_and_preprocess`` per site, every site trains alone (``SiteTrainer``).
* ``centralized``: the sites' cases pooled into one dataset (``data.pooled``), planned by stock nnU-Net and
  trained as one; fold n of the pooled dataset is the union of every site's fold n.
* ``ffe``: ``fednnunet run plan_and_preprocess`` + ``fednnunet run train`` (FedAvg on identical plans).
* ``asym``: the same with ``--asym`` (each site plans alone, AsymFedAvg).
* FFE variants (not in the default set; each compared with ``ffe``, paired, on the same cases and seeds), to find
  out what 16-bit transfer costs and why the aggregate can lose to the sites' local models (issue 17):
  ``ffe16`` (``--transfer-dtype float16``), ``ffe-uniform`` (``--weighting uniform``: the paper's plain mean
  instead of weights by training cases) and ``ffe-often`` (the same iterations, averaged 5 x as often: 5 x the
  rounds of 1/5 the iterations; local SGD momentum has less time to drive a site away from the others), and how
  SGD momentum meets averaging (aggregation/momentum.py): ``ffe-mom-reset`` (``--momentum reset``: the sites zero
  their buffers each round), ``ffe-mom-avg`` (``--momentum average``: the buffers are averaged with the weights, 2 x
  the bytes) and ``ffe-server-mom`` (``--server-momentum 0.5``: FedAvgM at the server); and what bounded influence
  costs: ``ffe-clip`` (``--clip-update-norm C``, C given to the benchmark: each site's change per round clipped).
  And personalization (issue 28): ``ffe-ft`` (``--finetune-epochs E``, E given to the benchmark): trained as FFE,
  then every internal site fine-tunes the final model E epochs on its own training cases; each internal site is
  evaluated with ITS OWN personal model (``nnUNetTrainer__nnUNetPlans_personal__<config>``, the same fold), the
  external sites with the global model (what a hospital outside the federation gets). It is compared with local
  as well as with FFE: is a hospital's personal model at least as good as the model it could train alone?
  ``ffe-bn`` (``--local-norm``, FedBN: every site keeps its normalization layers) evaluates each internal site with
  its own final model (the global weights with its normalization), ``ffe-bn-ft`` combines both; both are compared
  with local and FFE too. The external sites get the coordinator's global model (averaged normalization).

Same splits: before any training, every site's ``splits_final.json`` is written the way nnU-Net's trainer would
write it (``generate_crossval_split`` over the sorted case ids, seed 12345, 5 folds) into every method's
preprocessed folder, and the pooled dataset gets the union. Same budget: every method trains ``rounds`` epochs
of ``iterations_per_round`` iterations per fold (one federated round = one nnU-Net epoch at every site; the
centralized model therefore sees as many iterations as ONE site, on the pooled data, as in the paper where
all methods train the same number of epochs).

Repeats (``repeats``, ``seed``): every method is trained R times with seeds S .. S+R-1 on the same splits and
plans; ``results.json`` keeps every repeat, ``results.md`` shows mean +- sd over the repeats and, for FFE vs
centralized and FFE vs local, the paired DSC difference with a 95 % interval over cases and repeats
(``evaluation.intervals``). A site's seed stream is the same in every method (key: its dataset id), so repeat K of
local and of FFE start a site from the same draws.

External sites and per-site models: FFE has one global model (every site's checkpoint is the same), the
centralized method one model. Local training and AsymFedAvg leave one model per site; an external case is then
predicted by every internal site's fold ensemble and its per-case DSC / HD95 are the mean over those models
(``per_model`` in the per-case entry keeps each one). Predictions use nnU-Net's predictor without test-time
mirroring (``predict_cases`` default), for every method alike.

Everything that imports nnU-Net with a method's roots runs in a subprocess (``nnunetv2.paths`` reads the
variables once, at import): stock nnU-Net planning, ``fednnunet run ...``, and this module's own workers
(``python -m fednnunet.evaluation.benchmark train|predict SPEC.json``), which report progress as JSON lines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fednnunet.atomic_files import write_atomic
from fednnunet.training.personal import personal_plans

logger = logging.getLogger(__name__)

__all__ = ["run_benchmark", "BenchmarkError", "METHODS", "resolve_sites", "site_splits"]

METHODS = ("local", "centralized", "ffe", "asym")
#: FFE variants: name -> (extra ``fednnunet run train`` arguments, how many times as often the sites average).
FFE_VARIANTS: dict[str, tuple[tuple[str, ...], int]] = {
    "ffe16": (("--transfer-dtype", "float16"), 1),
    "ffe-uniform": (("--weighting", "uniform"), 1),
    "ffe-often": ((), 5),
    "ffe-mom-reset": (("--momentum", "reset"), 1),
    "ffe-mom-avg": (("--momentum", "average"), 1),
    "ffe-server-mom": (("--server-momentum", "0.5"), 1),
    "ffe-clip": (("--clip-update-norm",), 1),  # its bound C: run_benchmark's clip_update_norm
    "ffe-ft": (("--finetune-epochs",), 1),  # its E: run_benchmark's finetune_epochs
    "ffe-bn": (("--local-norm",), 1),
    "ffe-bn-ft": (("--local-norm", "--finetune-epochs"), 1),
}
#: The variant whose last argument is the benchmark's ``clip_update_norm``.
CLIP_VARIANT = "ffe-clip"
#: The variants whose last argument is the benchmark's ``finetune_epochs``; their internal sites predict with their
#: personal models.
FINETUNE_VARIANTS = ("ffe-ft", "ffe-bn-ft")
#: Methods that run only when asked for with ``methods``.
EXTRA_METHODS = tuple(FFE_VARIANTS)
PLANS = "nnUNetPlans"
TRAINER_DIR = "nnUNetTrainer__{plans}__{configuration}"
_PROGRESS = "@@progress "
_ROUND = re.compile(r"round (\d+)/(\d+)")


class BenchmarkError(RuntimeError):
    """A step of the benchmark failed; the message names the step and ends with the tail of its output."""


@dataclass(frozen=True)
class SiteData:
    key: str  # name in results (dataset name without the DatasetNNN_ prefix, unless ambiguous)
    id: int
    name: str  # DatasetNNN_Name
    folder: Path


# ------------------------------------------------------------------------------------------------ sites, splits


def resolve_sites(raw: Path, sites: Sequence[str | int]) -> list[SiteData]:
    """Raw dataset folders for ids (``901``), names (``Dataset901_SiteA``) or short names (``SiteA``)."""
    raw = Path(raw)
    found: list[tuple[int, str, Path]] = []
    for s in sites:
        s = str(s).strip()
        if s.isdigit():
            matches = sorted(raw.glob(f"Dataset{int(s):03d}_*"))
        elif re.fullmatch(r"Dataset\d{3}_.+", s):
            matches = [raw / s] if (raw / s).is_dir() else []
        else:
            matches = sorted(raw.glob(f"Dataset[0-9][0-9][0-9]_{s}"))
        matches = [m for m in matches if m.is_dir() and (m / "dataset.json").is_file()]
        if len(matches) != 1:
            raise BenchmarkError(f"site {s!r}: expected one raw dataset in {raw}, found "
                                 f"{[m.name for m in matches] or 'none'}")
        m = matches[0]
        found.append((int(m.name[7:10]), m.name, m))
    short = [n.split("_", 1)[1] for _, n, _ in found]
    out = []
    for (i, name, folder), s in zip(found, short):
        key = s if short.count(s) == 1 else name
        out.append(SiteData(key, i, name, folder))
    if len({d.id for d in out}) != len(out):
        raise BenchmarkError(f"a site is listed twice: {[d.name for d in out]}")
    return out


def _case_ids(folder: Path) -> list[str]:
    """Training case ids of a raw dataset (from its labelsTr), sorted as nnU-Net's trainer sorts them."""
    ending = json.loads((folder / "dataset.json").read_text())["file_ending"]
    ids = [f.name[: -len(ending)] for f in (folder / "labelsTr").iterdir()
           if f.name.endswith(ending) and not f.name.startswith(".")]
    return sorted(ids)


def site_splits(raw_folder: Path, n_splits: int = 5) -> list[dict[str, list[str]]]:
    """The 5-fold split nnU-Net's trainer creates for this dataset (``nnUNetTrainer.do_split``)."""
    import numpy as np
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    keys = [str(k) for k in np.sort(_case_ids(raw_folder))]
    if len(keys) < n_splits:
        raise BenchmarkError(f"{raw_folder.name} has {len(keys)} cases; {n_splits}-fold cross-validation needs "
                             f"at least {n_splits}")
    return [{"train": [str(k) for k in s["train"]], "val": [str(k) for k in s["val"]]}
            for s in generate_crossval_split(keys, seed=12345, n_splits=n_splits)]


def pooled_splits(splits: dict[int, list[dict[str, list[str]]]]) -> list[dict[str, list[str]]]:
    """Fold n of the pooled dataset = the union of every site's fold n (case ids prefixed ``s<id>_``)."""
    n = len(next(iter(splits.values())))
    return [{part: sorted(f"s{i}_{c}" for i, sp in splits.items() for c in sp[f][part]) for part in ("train", "val")}
            for f in range(n)]


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


# ------------------------------------------------------------------------------------------------ progress


class _Progress:
    """Progress events with an ETA from the finished fraction of (method x fold) training units."""

    def __init__(self, callback: Callable[[dict], None] | None, units: int) -> None:
        self.callback = callback
        self.units = max(units, 1)
        self.done = 0.0
        self.start = time.time()

    def __call__(self, message: str, *, method: str = "", site: str = "", fold: Any = "", round_: Any = "",
                 fraction_of_unit: float = 0.0) -> None:
        elapsed = time.time() - self.start
        frac = min(1.0, (self.done + fraction_of_unit) / self.units)
        eta = elapsed * (1 - frac) / frac if frac > 0 else None
        event = {"message": message, "method": method, "site": site, "fold": fold, "round": round_,
                 "elapsed": elapsed, "eta": eta, "fraction": frac}
        logger.info("[%s] %s", method, message)
        if self.callback is not None:
            self.callback(event)

    def unit_done(self) -> None:
        self.done += 1


def format_progress(event: dict) -> str:
    """One line for people: ``[  12s | ETA 3m05s] ffe fold 0 round 2/10 site SiteA: message``."""

    def dur(s: float | None) -> str:
        if s is None:
            return "?"
        s = int(round(s))
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

    where = " ".join(f"{k} {event[k]}" for k in ("fold", "round", "site") if event.get(k) not in ("", None))
    head = f"{event.get('method', '')} {where}".strip()
    head = f"{head}: " if head else ""
    return f"[{dur(event.get('elapsed'))} | ETA {dur(event.get('eta'))}] {head}{event.get('message', '')}"


# ------------------------------------------------------------------------------------------------ subprocesses


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def _stream(cmd: list[str], env: dict[str, str], step: str, on_line: Callable[[str], None] | None = None,
            log_file: Path | None = None) -> None:
    """Runs ``cmd``, feeding each output line to ``on_line``; raises BenchmarkError with the output's tail.

    The step is stopped with SIGTERM when the benchmark is interrupted or dies (even by SIGKILL: the kernel sends
    it, see ``processes.die_with_parent``): a ``fednnunet run`` then stops its SuperLink, SuperNodes and workers,
    which a SIGKILL would leave running on their own.
    """
    from fednnunet.processes import die_with_parent, terminate_all

    logger.info("%s: %s", step, shlex.join(cmd))
    tail: deque[str] = deque(maxlen=40)
    log = open(log_file, "a") if log_file else None
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True,  # a Ctrl-C reaches it through us
                                preexec_fn=die_with_parent if sys.platform == "linux" else None)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                tail.append(line.rstrip())
                if log:
                    log.write(line)
                if on_line:
                    on_line(line.rstrip("\n"))
            code = proc.wait()
        except BaseException:
            terminate_all([proc], grace_s=30.0)
            raise
    finally:
        if log:
            log.close()
    if code != 0:
        raise BenchmarkError(f"{step} failed (exit {code}): {shlex.join(cmd)}\n" + "\n".join(tail))


def _env(base: Path, raw: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["nnUNet_raw"] = str(raw)
    env["nnUNet_preprocessed"] = str(base / "nnUNet_preprocessed")
    env["nnUNet_results"] = str(base / "nnUNet_results")
    env.setdefault("nnUNet_def_n_proc", "1")
    env.update(extra)
    for v in ("nnUNet_preprocessed", "nnUNet_results"):
        Path(env[v]).mkdir(parents=True, exist_ok=True)
    return env


def _worker(kind: str, spec: dict, spec_file: Path, env: dict[str, str], step: str,
            on_event: Callable[[dict], None]) -> None:
    _write_json(spec_file, spec)

    def line(text: str) -> None:
        if text.startswith(_PROGRESS):
            on_event(json.loads(text[len(_PROGRESS):]))

    _stream([sys.executable, "-m", "fednnunet.evaluation.benchmark", kind, str(spec_file)], env, step, line,
            spec_file.with_suffix(".log"))


# ------------------------------------------------------------------------------------------------ the benchmark


def run_benchmark(raw: Path, sites: Sequence[str], configuration: str, out: Path,
                  external: Sequence[str] = (), folds: Sequence[int | str] = (0,), rounds: int = 10,
                  iterations_per_round: int = 250, methods: Sequence[str] = METHODS,
                  val_iterations: int | None = None, progress: Callable[[dict], None] | None = None,
                  command: str | None = None, seed: int | None = None, repeats: int = 1,
                  clip_update_norm: float | None = None, finetune_epochs: int | None = None) -> dict[str, Any]:
    """Runs the protocol (module docstring) and writes ``out/results.json``, ``results.md``, ``dsc.png`` and
    ``training_curves.png``; returns the results dict (``evaluation.report.build_repeated_results`` schema).

    Args:
        raw: the nnU-Net raw folder that holds the site datasets (read only; never written).
        sites: internal sites (ids, dataset names or short names); at least 2 for federated methods.
        configuration: nnU-Net configuration (``2d``, ``3d_fullres``).
        out: output folder (created; a new folder per benchmark, methods' nnU-Net roots live inside).
        external: sites never trained on, evaluated with the ensemble of ``folds``.
        folds: cross-validation folds (0-4) to train; internal sites are evaluated on these folds' held-out
            cases.
        rounds, iterations_per_round: the budget of every method per fold (epochs x iterations per epoch).
        val_iterations: nnU-Net's online validation iterations per epoch (default: iterations / 5, 1..50).
        progress: called with a dict per event (``format_progress`` makes a line of it).
        command: the command line to record (default: the Python call).
        seed: seeds every method's training (``fednnunet.seeding``; each site and the pooled dataset draw their own
            stream); None: unseeded, as nnU-Net (with ``repeats`` > 1: 0).
        repeats: every method is trained (and evaluated) this many times, with seeds ``seed .. seed + repeats - 1``,
            on the same splits and plans (planned once per method).
        clip_update_norm: the bound C of the ``ffe-clip`` method (required with it).
        finetune_epochs: the fine-tuning epochs E of the ``ffe-ft`` and ``ffe-bn-ft`` methods (default: a tenth of
            ``rounds``, at least 1: the personal model then trains 10 % beyond the budget of every other method, so
            the comparison with local stays close to equal budget, and E follows the budget's scale instead of
            being a fixed number that is negligible at 100 rounds and dominant at 3).
    """
    from fednnunet.evaluation.predict import normalize_folds

    started = time.time()
    raw, out = Path(raw).resolve(), Path(out).resolve()
    methods = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    unknown = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if unknown or not methods:
        raise BenchmarkError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    folds = normalize_folds(list(folds))
    if any(f == "all" or not 0 <= int(f) < 5 for f in folds):
        raise BenchmarkError(f"folds must be in 0..4 (cross-validation), got {folds}")
    if rounds < 1 or iterations_per_round < 1 or repeats < 1:
        raise BenchmarkError("rounds, iterations_per_round and repeats must be >= 1")
    for method in methods:
        every = FFE_VARIANTS.get(method, ((), 1))[1]
        if iterations_per_round % every:
            raise BenchmarkError(f"{method} averages {every} x as often: iterations_per_round ({iterations_per_round}) "
                                 f"must be a multiple of {every}")
    if seed is not None and seed < 0:
        raise BenchmarkError(f"seed must be >= 0, got {seed}")
    if CLIP_VARIANT in methods and not (clip_update_norm or 0) > 0:
        raise BenchmarkError(f"{CLIP_VARIANT} needs its bound: pass clip_update_norm (--clip-update-norm C) > 0")
    if finetune_epochs is None:
        finetune_epochs = max(1, rounds // 10)
    if finetune_epochs < 1:
        raise BenchmarkError(f"{'/'.join(FINETUNE_VARIANTS)}: finetune_epochs must be >= 1, got {finetune_epochs}")
    seeds: list[int | None] = [seed] if seed is None and repeats == 1 else [(seed or 0) + k for k in range(repeats)]
    val_iterations = val_iterations or max(1, min(50, iterations_per_round // 5))
    internal = resolve_sites(raw, sites)
    ext = resolve_sites(raw, external) if external else []
    if {d.id for d in internal} & {d.id for d in ext}:
        raise BenchmarkError("a site cannot be internal and external at once")
    if len({d.key for d in internal + ext}) != len(internal + ext):
        raise BenchmarkError("two sites have the same name")
    if len(internal) < 2 and {"ffe", "asym", "centralized"} & set(methods):
        raise BenchmarkError("federated and centralized methods need at least 2 internal sites")
    out.mkdir(parents=True, exist_ok=True)

    splits = {d.id: site_splits(d.folder) for d in internal}
    prog = _Progress(progress, len(methods) * len(folds) * repeats)
    budget = {"configuration": configuration, "folds": folds, "rounds": rounds,
              "iterations_per_round": iterations_per_round, "val_iterations_per_round": val_iterations,
              "iterations_per_fold": rounds * iterations_per_round, "repeats": repeats, "seeds": seeds}
    if set(FINETUNE_VARIANTS) & set(methods):
        budget["finetune_epochs"] = finetune_epochs
    ctx = _Context(raw, out, configuration, internal, ext, folds, rounds, iterations_per_round, val_iterations,
                   splits, prog)
    ctx.clip_update_norm = clip_update_norm
    ctx.finetune_epochs = finetune_epochs
    per_repeat: list[dict[str, dict[str, list]]] = []
    metrics_files: dict[str, list[Path]] = {m: [] for m in methods}  # every repeat's (first fold)
    timings: dict[str, float] = {m: 0.0 for m in methods}
    for k, repeat_seed in enumerate(seeds):
        ctx.repeat, ctx.seed = k, repeat_seed
        per_method: dict[str, dict[str, list]] = {}
        for method in methods:
            t0 = time.time()
            per_method[method], curve = ctx.run(method)
            metrics_files[method].append(curve)
            timings[method] = round(timings[method] + time.time() - t0, 1)
            prog(f"repeat {k + 1}/{repeats} (seed {repeat_seed}) done in {time.time() - t0:.0f} s", method=method)
        per_repeat.append(per_method)

    from fednnunet.evaluation.report import (build_repeated_results, plot_dsc, plot_training_curves, write_markdown,
                                             write_results_json)

    budget["wall_seconds"] = round(time.time() - started, 1)
    budget["wall_seconds_per_method"] = timings
    if command is None:
        command = (f"run_benchmark(raw={str(raw)!r}, sites={[d.key for d in internal]}, configuration="
                   f"{configuration!r}, external={[d.key for d in ext]}, folds={folds}, rounds={rounds}, "
                   f"iterations_per_round={iterations_per_round}, methods={methods}, seed={seed}, repeats={repeats}, "
                   f"clip_update_norm={clip_update_norm}, finetune_epochs={finetune_epochs})")
    results = build_repeated_results(per_repeat, seeds, command, budget, external_sites=[d.key for d in ext])
    results["averaging_gap"] = _averaging(metrics_files, internal)
    results["sites"] = {d.key: {"id": d.id, "dataset": d.name, "external": d in ext} for d in internal + ext}
    results["predictions"] = {m: {d.key: [f for k in range(repeats) for f in _prediction_folders(
        out / m / f"repeat_{k}" / "predictions", d, d in ext)] for d in internal + ext} for m in methods}
    write_results_json(results, out / "results.json")
    write_markdown(results, out / "results.md")
    with open(out / "results.md", "a") as f:
        f.write(_NOTES.format(out=out))
    plot_dsc(results, out / "dsc.png")
    plot_training_curves({m: files[0] for m, files in metrics_files.items()}, out / "training_curves.png")  # repeat 0
    prog(f"wrote {out / 'results.json'}, results.md, dsc.png, training_curves.png in {budget['wall_seconds']:.0f} s")
    return results


class _Context:
    def __init__(self, raw, out, configuration, internal, ext, folds, rounds, iterations, val_iterations, splits,
                 prog):
        self.raw, self.out, self.configuration = raw, out, configuration
        self.internal: list[SiteData] = internal
        self.ext: list[SiteData] = ext
        self.folds, self.rounds, self.iterations, self.val_iterations = folds, rounds, iterations, val_iterations
        self.splits, self.prog = splits, prog
        self.repeat, self.seed = 0, None  # set per training repeat by run_benchmark
        self.clip_update_norm: float | None = None  # the bound of CLIP_VARIANT
        self.finetune_epochs = 1  # the fine-tuning epochs of FINETUNE_VARIANTS

    # ----------------------------------------------------------------------------------------- helpers

    def _base(self, method: str) -> Path:
        """The method's folder: raw links (centralized), preprocessed data and plans, shared by its repeats."""
        return self.out / method

    def _run_dir(self, method: str) -> Path:
        """This repeat's folder of the method: nnU-Net results, runs (metrics, logs) and predictions."""
        return self._base(method) / f"repeat_{self.repeat}"

    def _env(self, method: str, raw: Path) -> dict[str, str]:
        """The method's nnU-Net roots: its preprocessed folder, this repeat's results folder."""
        return _env(self._base(method), raw, nnUNet_results=str(self._run_dir(method) / "nnUNet_results"))

    def _write_splits(self, method: str, datasets: Sequence[SiteData]) -> None:
        pre = self._base(method) / "nnUNet_preprocessed"
        for d in datasets:
            _write_json(pre / d.name / "splits_final.json", self.splits[d.id])

    def _model_folder(self, method: str, dataset_name: str, plans: str = PLANS) -> Path:
        return (self._run_dir(method) / "nnUNet_results" / dataset_name /
                TRAINER_DIR.format(plans=plans, configuration=self.configuration))

    def _on_worker_event(self, method: str) -> Callable[[dict], None]:
        def on(e: dict) -> None:
            frac = e.get("fraction_of_unit", 0.0)
            self.prog(e.get("message", ""), method=method, site=e.get("site", ""), fold=e.get("fold", ""),
                      round_=e.get("round", ""), fraction_of_unit=frac)
        return on

    def _plan_stock(self, method: str, env: dict[str, str], ids: Sequence[int]) -> None:
        if self.repeat > 0:
            return  # planned in the first repeat: plans and preprocessing do not depend on the training seed
        self.prog(f"nnUNetv2_plan_and_preprocess {' '.join(map(str, ids))}", method=method)
        from fednnunet.planning.site_planning import planner_env

        _stream([_bin("nnUNetv2_plan_and_preprocess"), "-d", *map(str, ids), "-c", self.configuration, "-np", "1"],
                planner_env(env), f"{method}: nnUNetv2_plan_and_preprocess", log_file=self._base(method) / "plan.log")

    def _train_stock(self, method: str, env: dict[str, str], datasets: Sequence[SiteData]) -> Path:
        """Trains every dataset alone, fold by fold, in a worker process; returns the first fold's metrics file."""
        first = None
        for fold in self.folds:
            run = self._run_dir(method) / "runs" / f"fold_{fold}"
            spec = {"datasets": [[d.id, d.key] for d in datasets], "configuration": self.configuration,
                    "fold": fold, "rounds": self.rounds, "iterations": self.iterations,
                    "val_iterations": self.val_iterations, "metrics_file": str(run / "metrics.jsonl"),
                    "seed": self.seed}
            self.prog("training", method=method, fold=fold)
            _worker("train", spec, run / "train_spec.json", env, f"{method}: training fold {fold}",
                    self._on_worker_event(method))
            self.prog.unit_done()
            first = first or run / "metrics.jsonl"
        assert first is not None
        return first

    def _fednnunet(self, method: str, env: dict[str, str], args: list[str], step: str, fold: Any = "") -> None:
        def line(text: str) -> None:
            m = _ROUND.search(text)
            if m:
                r, n = int(m.group(1)), int(m.group(2))
                self.prog(text.split("] ", 1)[-1][:160], method=method, fold=fold, round_=f"{r}/{n}",
                          fraction_of_unit=r / max(n, 1) * 0.95)
        _stream([sys.executable, "-m", "fednnunet.cli", *args], env, step, line,
                self._run_dir(method) / "federation.log")

    def _train_federated(self, method: str, env: dict[str, str], asym: bool, train_args: Sequence[str] = (),
                         every: int = 1) -> Path:
        """``every``: the sites average that many times as often (rounds x every of iterations / every)."""
        ids = " ".join(str(d.id) for d in self.internal)
        if self.repeat == 0:  # later repeats train on the same plans
            self.prog("federated plan_and_preprocess" + (" --asym" if asym else ""), method=method)
            # --no-check: stock nnUNetv2_plan_and_preprocess (local, centralized) verifies nothing, so the
            # federated methods skip the per-case check too and every method does the same work.
            self._fednnunet(method, env, ["run", "plan_and_preprocess", ids, "-c", self.configuration, "--no-check",
                                          "--out", str(self._base(method) / "runs" / "plan_and_preprocess"),
                                          *(["--asym"] if asym else [])], f"{method}: plan_and_preprocess")
            self._write_splits(method, self.internal)
        first = None
        for fold in self.folds:
            run = self._run_dir(method) / "runs" / f"fold_{fold}"
            self.prog("federated training", method=method, fold=fold)
            self._fednnunet(method, env, [
                "run", "train", ids, self.configuration, str(fold), "--rounds", str(self.rounds * every),
                "--iterations-per-round", str(self.iterations // every),
                "--val-iterations", str(max(1, self.val_iterations // every)),
                "--skip-val", "--da-workers", "0", "--out", str(run), *(["--asym"] if asym else []),
                *([] if self.seed is None else ["--seed", str(self.seed)]), *train_args],
                f"{method}: training fold {fold}", fold=fold)
            self.prog.unit_done()
            metrics = next(iter(sorted(run.rglob("metrics.jsonl"))), run / "metrics.jsonl")
            first = first or metrics
        assert first is not None
        return first

    def _predict(self, method: str, env: dict[str, str], jobs: list[dict]) -> None:
        self.prog(f"predicting {sum(len(j['cases']) for j in jobs)} case(s)", method=method)
        _worker("predict", {"jobs": jobs}, self._run_dir(method) / "predict_spec.json", env,
                f"{method}: prediction", self._on_worker_event(method))

    def _cv_jobs(self, method: str, model_of: Callable[[SiteData], Path]) -> list[dict]:
        from fednnunet.evaluation.predict import case_input_files

        jobs = []
        for d in self.internal:
            for fold in self.folds:
                cases = self.splits[d.id][int(fold)]["val"]
                jobs.append({"model_folder": str(model_of(d)), "folds": [fold],
                             "cases": case_input_files(d.folder, cases),
                             "output": str(self._run_dir(method) / "predictions" / d.key), "site": d.key})
        return jobs

    def _ext_jobs(self, method: str, models: dict[str, Path]) -> list[dict]:
        from fednnunet.evaluation.predict import case_input_files

        return [{"model_folder": str(folder), "folds": list(self.folds), "cases": case_input_files(e.folder),
                 "output": str(self._run_dir(method) / "predictions" / "external" / e.key / model_key),
                 "site": e.key}
                for e in self.ext for model_key, folder in models.items()]

    def _evaluate(self, pred_dir: Path, d: SiteData) -> list[dict]:
        from fednnunet.evaluation.report import evaluate_predictions

        return evaluate_predictions(pred_dir, d.folder / "labelsTr", d.folder / "dataset.json")["per_case"]

    def _evaluate_external(self, method: str, model_keys: Sequence[str]) -> dict[str, list]:
        out: dict[str, list] = {}
        for e in self.ext:
            by_model = {k: {c["case"]: c for c in self._evaluate(
                self._run_dir(method) / "predictions" / "external" / e.key / k, e)} for k in model_keys}
            out[e.key] = _combine_models(by_model)
        return out

    def _finish_per_site(self, method: str, env: dict[str, str], model_of: Callable[[SiteData], Path],
                         ext_models: dict[str, Path]) -> dict[str, list]:
        self._predict(method, env, self._cv_jobs(method, model_of) + self._ext_jobs(method, ext_models))
        res = {d.key: self._evaluate(self._run_dir(method) / "predictions" / d.key, d) for d in self.internal}
        res.update(self._evaluate_external(method, list(ext_models)))
        return res

    # ----------------------------------------------------------------------------------------- methods

    def _run_local(self) -> tuple[dict, Path]:
        env = self._env("local", self.raw)
        self._plan_stock("local", env, [d.id for d in self.internal])
        self._write_splits("local", self.internal)
        curves = self._train_stock("local", env, self.internal)
        models = {d.key: self._model_folder("local", d.name) for d in self.internal}
        return self._finish_per_site("local", env, lambda d: models[d.key], models), curves

    def run(self, method: str) -> tuple[dict, Path]:
        """Train and evaluate one method for the current repeat: per-site per-case results, training curves."""
        if method in FFE_VARIANTS:
            train_args, every = FFE_VARIANTS[method]
            if method == CLIP_VARIANT:
                train_args = (*train_args, repr(self.clip_update_norm))
            if method in FINETUNE_VARIANTS:
                train_args = (*train_args, str(self.finetune_epochs))
            site_plans = personal_plans(PLANS) if method in FINETUNE_VARIANTS else PLANS
            return self._run_ffe(method=method, train_args=train_args, every=every, site_plans=site_plans)
        return getattr(self, f"_run_{method}")()

    def _run_ffe(self, asym: bool = False, method: str = "ffe", train_args: Sequence[str] = (),
                 every: int = 1, site_plans: str = PLANS) -> tuple[dict, Path]:
        """``site_plans``: the plans identifier of the model each internal site is evaluated with (the personal
        models' for the fine-tuning variants); an internal site's own final model is the global one in FFE and
        the global weights with its own normalization with ``--local-norm``. The external sites always get the
        federation's model: every site's with AsymFedAvg, the coordinator's global model otherwise."""
        method = "asym" if asym else method
        env = self._env(method, self.raw)
        curves = self._train_federated(method, env, asym, train_args, every)
        models = {d.key: self._model_folder(method, d.name) for d in self.internal}
        ext_models = models if asym or not self.ext else {"global": self._global_model(method)}
        own = {d.key: self._model_folder(method, d.name, site_plans) for d in self.internal}
        return self._finish_per_site(method, env, lambda d: own[d.key], ext_models), curves

    def _global_model(self, method: str) -> Path:
        """The coordinator's global model of every fold as one nnU-Net model folder (links to each fold's run
        output, ``runs/fold_X/global/``), so that the folds' ensemble predicts the external sites."""
        trainer_dir = TRAINER_DIR.format(plans=PLANS, configuration=self.configuration)
        folder = self._run_dir(method) / "global_model" / trainer_dir
        folder.mkdir(parents=True, exist_ok=True)
        sources = {fold: self._run_dir(method) / "runs" / f"fold_{fold}" / "global" / trainer_dir
                   for fold in self.folds}
        links = {f"fold_{fold}": source / f"fold_{fold}" for fold, source in sources.items()}
        first = sources[self.folds[0]]  # the plans are the same in every fold
        links.update({name: first / name for name in ("plans.json", "dataset.json", "dataset_fingerprint.json")})
        for name, target in links.items():
            (folder / name).unlink(missing_ok=True)
            (folder / name).symlink_to(target)
        return folder

    def _run_asym(self) -> tuple[dict, Path]:
        return self._run_ffe(asym=True)

    def _run_centralized(self) -> tuple[dict, Path]:
        from fednnunet.data.pooled import pool_datasets

        base = self._base("centralized")
        craw = base / "nnUNet_raw"
        craw.mkdir(parents=True, exist_ok=True)
        for d in self.internal:
            if not (craw / d.name).exists():
                os.symlink(d.folder, craw / d.name)
        used = {int(p.name[7:10]) for p in list(self.raw.glob("Dataset[0-9][0-9][0-9]_*"))
                + list(craw.glob("Dataset[0-9][0-9][0-9]_*"))}
        pooled = next((p for p in sorted(craw.glob("Dataset[0-9][0-9][0-9]_Pooled")) if not p.is_symlink()), None)
        if pooled is None:
            pooled_id = next(i for i in range(999, 0, -1) if i not in used)
            pooled = pool_datasets(craw, [d.id for d in self.internal], pooled_id, name="Pooled")
        pooled_id = int(pooled.name[7:10])
        env = self._env("centralized", craw)
        self._plan_stock("centralized", env, [pooled_id])
        _write_json(base / "nnUNet_preprocessed" / pooled.name / "splits_final.json", pooled_splits(self.splits))
        pooled_site = SiteData("Pooled", pooled_id, pooled.name, pooled)
        curves = self._train_stock("centralized", env, [pooled_site])
        model = self._model_folder("centralized", pooled.name)
        run_dir = self._run_dir("centralized")
        from fednnunet.evaluation.predict import case_input_files

        jobs = [{"model_folder": str(model), "folds": [fold],
                 "cases": case_input_files(pooled, pooled_splits(self.splits)[int(fold)]["val"]),
                 "output": str(run_dir / "predictions" / "pooled"), "site": "Pooled"} for fold in self.folds]
        self._predict("centralized", env, jobs + self._ext_jobs("centralized", {"pooled": model}))
        # The pooled predictions go back to their sites under the sites' own case ids (predictions/<site>/, as
        # for every other method), so they are scored against the sites' own labels and can be re-scored alike.
        res: dict[str, list] = {}
        ending = json.loads((pooled / "dataset.json").read_text())["file_ending"]
        for d in self.internal:
            site_dir = run_dir / "predictions" / d.key
            site_dir.mkdir(parents=True, exist_ok=True)
            prefix = f"s{d.id}_"
            for f in sorted((run_dir / "predictions" / "pooled").glob(f"{prefix}*{ending}")):
                shutil.copyfile(f, site_dir / f.name[len(prefix):])
            res[d.key] = self._evaluate(site_dir, d)
        res.update(self._evaluate_external("centralized", ["pooled"]))
        return res, curves


_NOTES = """
Notes:

- Internal sites: cross-validation; every case is predicted by the model of the fold that held it out
  (`<method>/repeat_K/predictions/<site>/`). External sites: all cases, predicted by the ensemble of the trained
  folds (`<method>/repeat_K/predictions/external/<site>/<model>/`). Local training and AsymFedAvg leave one model per internal
  site: an external case's DSC / HD95 is then the mean over those models (each model's value is in
  `results.json`, `per_model`). FFE has one global model, centralized training one pooled model.
- Predictions without test-time mirroring, the same for every method. Every method trains the same number of
  epochs (federated rounds) of the same number of iterations per fold.
- Output folder: `{out}`.
"""


def _averaging(metrics_files: dict[str, list[Path]], internal: Sequence[SiteData]) -> dict[str, Any]:
    """What averaging cost each site, per federated method (``evaluation.averaging``), keyed by the sites' names in
    the results (the federation names a site by its dataset id); methods without delivered validation are left
    out."""
    from fednnunet.evaluation.averaging import averaging_table
    from fednnunet.evaluation.report import read_round_records

    key_of = {str(d.id): d.key for d in internal}
    table = averaging_table({m: [read_round_records(p) for p in files if p.is_file()]
                             for m, files in metrics_files.items()})
    return {m: {key_of.get(site, site): e for site, e in per_site.items()} for m, per_site in table.items() if per_site}


def _prediction_folders(pred_root: Path, d: SiteData, external: bool) -> list[str]:
    if not external:
        return [str(pred_root / d.key)]
    return sorted(str(p) for p in (pred_root / "external" / d.key).glob("*") if p.is_dir())


def _combine_models(by_model: dict[str, dict[str, dict]]) -> list[dict]:
    """Per case: mean DSC / HD95 over the models that predicted it; each model's values under ``per_model``."""
    import numpy as np

    cases = sorted(set().union(*[set(v) for v in by_model.values()]))
    out = []
    for c in cases:
        vals = {k: v[c] for k, v in by_model.items() if c in v}
        entry = {"case": c, "dsc": float(np.mean([v["dsc"] for v in vals.values()])),
                 "hd95": float(np.mean([v["hd95"] for v in vals.values()]))}
        if len(by_model) > 1:
            entry["per_model"] = {k: {"dsc": v["dsc"], "hd95": v["hd95"]} for k, v in vals.items()}
        else:
            entry["per_class"] = next(iter(vals.values())).get("per_class")
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------ workers


def _emit(**event: Any) -> None:
    print(_PROGRESS + json.dumps(event), flush=True)


def _worker_train(spec: dict) -> None:
    """Trains each dataset alone with the budget (one process; nnU-Net's roots come from the environment)."""
    from fednnunet.seeding import derive_seed
    from fednnunet.training.site_trainer import SiteTrainer

    rounds, fold = spec["rounds"], spec["fold"]
    records: list[dict] = [{"round": r + 1, "rounds": rounds, "fold": fold, "sites": {}} for r in range(rounds)]
    n = len(spec["datasets"])
    for i, (dataset_id, key) in enumerate(spec["datasets"]):
        _emit(message="building trainer", site=key, fold=fold, fraction_of_unit=i / n)
        # the same stream as the site's in a federation (TrainingSession: key "site", the site id)
        seed = None if spec.get("seed") is None else derive_seed(int(spec["seed"]), "site", str(dataset_id))
        st = SiteTrainer(dataset_id, spec["configuration"], fold=fold, device=spec.get("device", "cpu"),
                         total_epochs=rounds, iterations_per_epoch=spec["iterations"],
                         val_iterations=spec["val_iterations"], num_workers=0, seed=seed)
        for r in range(rounds):
            m = st.run_epoch()
            records[r]["sites"][key] = m
            _emit(message=f"train loss {m['train_loss']:.3f} val loss {m['val_loss']:.3f} "
                          f"pseudo-Dice {m['mean_fg_dice']:.3f} ({m['epoch_seconds']:.1f} s)",
                  site=key, fold=fold, round=f"{r + 1}/{rounds}", fraction_of_unit=(i + (r + 1) / rounds) / n * 0.95)
        st.finish(validate=False)
    path = Path(spec["metrics_file"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records))


def _worker_predict(spec: dict) -> None:
    from fednnunet.evaluation.predict import predict_cases

    for job in spec["jobs"]:
        t = time.time()
        predict_cases(job["model_folder"], job["folds"], job["cases"], job["output"], device=spec.get("device", "cpu"),
                      sequential=True)
        _emit(message=f"predicted {len(job['cases'])} case(s) with folds {job['folds']} of "
                      f"{Path(job['model_folder']).parent.name} in {time.time() - t:.1f} s", site=job["site"])


def _main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("train", "predict"):
        print("usage: python -m fednnunet.evaluation.benchmark train|predict SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(argv[1]).read_text())
    (_worker_train if argv[0] == "train" else _worker_predict)(spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
