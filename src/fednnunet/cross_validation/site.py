"""The site half of federated ``nnUNetv2_find_best_configuration``: evaluate here, decide at the coordinator.

The coordinator (:mod:`fednnunet.cross_validation.coordinator`) asks every site three things (the requests of
:mod:`fednnunet.protocol.messages`, handed here by :mod:`fednnunet.cross_validation.site_ops`):

1. ``evaluate`` (``CvEvaluate``): gather the cross-validation predictions that the final validations of the
   requested folds wrote (``<model>/crossval_results_folds_X``, as ``accumulate_cv_results``), ensemble every pair
   of models from their ``--npz`` probabilities (``ensembles/ensemble___A___B___X``, as
   ``ensemble_crossvalidations``), score each with nnU-Net's ``compute_metrics`` and reply only
   :class:`~fednnunet.cross_validation.aggregates.MetricSums`;
2. ``postprocess`` (``CvPostprocess``) once per step of nnU-Net's postprocessing search (all foreground, then
   every class when there are several): apply nnU-Net's ``remove_all_but_largest_component_from_segmentation`` to
   the current predictions of the chosen model or ensemble and reply the sums of the result; the next request says
   whether the pooled result kept that step (then it becomes the current predictions, as in
   ``determine_postprocessing``);
3. ``finish`` (``CvFinish``): write what ``nnUNetv2_find_best_configuration`` writes, with nnU-Net's functions,
   from the server's decisions: ``postprocessed/``, ``postprocessing.pkl`` (pickled here: nothing received is ever
   unpickled), ``postprocessing.json``, ``inference_information.json`` and ``inference_instructions.txt``
   (nnU-Net's ``print_inference_instructions``), so the printed ``nnUNetv2_predict`` / ``nnUNetv2_ensemble`` /
   ``nnUNetv2_apply_postprocessing`` commands work at this site as they are.

Files that describe this site's cases (``summary.json`` of each folder, the postprocessed predictions) hold this
site's cases; the figures behind a decision (``postprocessing.json``, ``all_results`` and the results before and
after postprocessing in ``inference_information.json``) are the pooled ones every site shares, and
``find_best_configuration_federated.json`` beside them keeps the server's whole decision with the pooled table.

Why nnU-Net's per-case functions (``compute_metrics``, ``merge_files``, ``load_postprocess_save``) and not its
folder-level ones: the aggregates need the per-case values in this process, and every folder-level call starts a
``spawn`` pool whose start-up (importing torch, ~2 s) dominates small runs. With ``-np`` > 1 the cases are spread
over a ``spawn`` pool of that size, as nnU-Net does. Per-case values stay here unless the site's operator sets
``FEDNNUNET_SHARE_PER_CASE=1`` (``--share-per-case``): then each case's Dice per class goes to the server too.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fednnunet.atomic_files import write_json_atomic
from fednnunet.cross_validation.aggregates import MetricSums, json_number, selected_models
from fednnunet.protocol.messages import (Candidate, CvEvaluate, CvEvaluateReply, CvFinish, CvFinishReply,
                                         CvPostprocess, CvPostprocessReply)

logger = logging.getLogger(__name__)

__all__ = ["SiteCrossValidation", "SHARE_PER_CASE_ENV", "FEDERATED_DECISION_FILE"]

#: set to 1 at a site to send each case's Dice per class to the server as well
SHARE_PER_CASE_ENV = "FEDNNUNET_SHARE_PER_CASE"
#: the server's decision and pooled table, written beside nnU-Net's inference_information.json
FEDERATED_DECISION_FILE = "find_best_configuration_federated.json"
_TEMP = "temp"


def starmap(fn: Callable[..., Any], args: Sequence[tuple], num_processes: int) -> list[Any]:
    """``fn(*a)`` for every ``a``: here with one process, else in a ``spawn`` pool like nnU-Net's."""
    if num_processes <= 1 or len(args) <= 1:
        return [fn(*a) for a in args]
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(args))) as pool:
        return pool.starmap(fn, args)


@dataclass
class ScoredCandidate:
    """A model or an ensemble of two, by nnU-Net's identifier, with the folder of its cross-validation
    predictions here and their sums."""

    key: str
    folder: Path
    sums: MetricSums
    per_case: list[dict[str, Any]]


class SiteCrossValidation:
    """One site's part of a federated find_best_configuration run (held by the worker between requests)."""

    def __init__(self, site: str, dataset: str, request: CvEvaluate) -> None:
        from nnunetv2.configuration import default_num_processes
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        self.site = site
        self.dataset_name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
        self.trainers = list(request.trainers)
        self.configurations = list(request.configurations)
        self.plans = list(request.plans)
        self.folds = list(request.folds)
        self.allow_ensembling = request.allow_ensembling
        self.num_processes = int(default_num_processes if request.num_processes is None else request.num_processes)
        self.overwrite = request.overwrite
        self.share_per_case = os.environ.get(SHARE_PER_CASE_ENV, "") == "1"
        self.models: list[dict[str, str]] = []
        self.candidates: dict[str, ScoredCandidate] = {}
        # postprocessing search state (determine_postprocessing's ``source`` and its pending step)
        self._best: ScoredCandidate | None = None
        self._source: Path | None = None
        self._pending: tuple[int, Path, dict[str, Any]] | None = None
        self._kept: list[dict[str, Any]] = []
        self._decided: list[bool] = []

    # --- nnU-Net's view of this dataset --------------------------------------------------------------------
    def _results(self) -> Path:
        from nnunetv2.paths import nnUNet_results

        return Path(nnUNet_results.require()) / self.dataset_name

    def _gt_segmentations(self) -> Path:
        from nnunetv2.paths import nnUNet_preprocessed

        return Path(nnUNet_preprocessed.require()) / self.dataset_name / "gt_segmentations"

    def _label_setup(self, folder: Path) -> tuple[Any, Any, dict[str, Any]]:
        """(reader/writer, label manager, dataset.json) of a model folder, as nnU-Net's tool takes them."""
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans = PlansManager(str(folder / "plans.json"))
        dataset_json = load_json(str(folder / "dataset.json"))
        return plans.image_reader_writer_class(), plans.get_label_manager(dataset_json), dataset_json

    def _evaluate_folder(self, reference: Path, predictions: Path, setup: tuple[Any, Any, dict[str, Any]]
                         ) -> tuple[MetricSums, list[dict[str, Any]]]:
        """nnU-Net's ``compute_metrics`` for every prediction; writes ``summary.json`` the way nnU-Net does (its
        means from the same sums the site sends) and returns the sums and the per-case Dice."""
        from nnunetv2.evaluation.evaluate_predictions import (compute_metrics, key_to_label_or_region,
                                                              label_or_region_to_key, save_summary_json)
        from nnunetv2.utilities.json_export import recursive_fix_for_json_export

        rw, labels, dataset_json = setup
        regions = labels.foreground_regions if labels.has_regions else labels.foreground_labels
        files = sorted(p.name for p in predictions.iterdir()
                       if p.is_file() and p.name.endswith(dataset_json["file_ending"]))
        missing = [f for f in files if not (reference / f).is_file()]
        if missing:
            raise FileNotFoundError(f"no reference segmentation in {reference} for {', '.join(missing)}")
        results = starmap(compute_metrics, [(str(reference / f), str(predictions / f), rw, regions,
                                             labels.ignore_label) for f in files], self.num_processes)
        classes = [label_or_region_to_key(r) for r in regions]
        per_case = [{label_or_region_to_key(k): v for k, v in r["metrics"].items()} for r in results]
        sums = MetricSums.of_cases(per_case, classes)
        means = {key_to_label_or_region(c): m for c, m in sums.means().items()}
        for r in results:
            recursive_fix_for_json_export(r)
        summary = {"metric_per_case": results, "mean": means, "foreground_mean": sums.foreground_mean()}
        save_summary_json(summary, str(predictions / "summary.json"))
        cases = [{"case": f[: -len(dataset_json["file_ending"])],
                  "Dice": {c: json_number(float(pc[c]["Dice"])) for c in classes}} for f, pc in zip(files, per_case)]
        return sums, cases

    # --- 1. evaluate -----------------------------------------------------------------------------------------
    def evaluate(self) -> CvEvaluateReply:
        from copy import deepcopy

        from nnunetv2.evaluation.find_best_configuration import (dumb_trainer_config_plans_to_trained_models_dict,
                                                                 filter_available_models)
        from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key
        from nnunetv2.paths import nnUNet_raw
        from nnunetv2.utilities.file_path_utilities import (folds_tuple_to_string, get_ensemble_name,
                                                            get_output_folder)

        wanted = dumb_trainer_config_plans_to_trained_models_dict(self.trainers, self.configurations, self.plans)
        self.models = [dict(m) for m in filter_available_models(deepcopy(wanted), self.dataset_name)]
        if not self.models:
            raise RuntimeError(f"none of the models {list(wanted)} is planned for {self.dataset_name}")
        folders = [Path(get_output_folder(self.dataset_name, m["trainer"], m["plans"], m["configuration"]))
                   for m in self.models]
        raw_labels = Path(str(nnUNet_raw)) / self.dataset_name / "labelsTr" if nnUNet_raw.is_set() else None
        for folder in folders:
            merged = folder / f"crossval_results_folds_{folds_tuple_to_string(self.folds)}"
            setup = self._label_setup(folder)
            self._accumulate(folder, merged, setup[2]["file_ending"])
            # accumulate_cv_results scores against the raw labels when they are there
            reference = raw_labels if raw_labels is not None and raw_labels.is_dir() else self._gt_segmentations()
            self._add(folder.name, merged, reference, setup)
        if self.allow_ensembling:
            for i in range(len(folders)):
                for j in range(i + 1, len(folders)):
                    key = get_ensemble_name(str(folders[i]), str(folders[j]), self.folds)
                    out = self._results() / "ensembles" / key
                    setup = self._label_setup(folders[i])
                    self._ensemble([folders[i], folders[j]], out, setup)
                    self._add(key, out, self._gt_segmentations(), setup)
        _, labels, _ = self._label_setup(folders[0])
        regions = labels.foreground_regions if labels.has_regions else labels.foreground_labels
        return CvEvaluateReply(
            dataset_name=self.dataset_name, models=self.models, classes=[label_or_region_to_key(r) for r in regions],
            candidates=[Candidate(key=c.key, sums=c.sums.to_json()) for c in self.candidates.values()],
            per_case={c.key: c.per_case for c in self.candidates.values()} if self.share_per_case else None)

    def _add(self, key: str, folder: Path, reference: Path, setup: tuple[Any, Any, dict[str, Any]]) -> None:
        sums, cases = self._evaluate_folder(reference, folder, setup)
        self.candidates[key] = ScoredCandidate(key, folder, sums, cases)
        logger.info("site %s: %s: %d case(s), foreground mean Dice %.4f", self.site, key, sums.num_cases, sums.dice())

    def _accumulate(self, model_folder: Path, merged: Path, file_ending: str) -> None:
        """The folds' validation predictions in one folder, with plans.json and dataset.json (as nnU-Net's
        ``accumulate_cv_results``, which would also score them in a pool of its own)."""
        if self.overwrite and merged.is_dir():
            shutil.rmtree(merged)
        merged.mkdir(parents=True, exist_ok=True)
        for name in ("dataset.json", "plans.json"):
            shutil.copy(model_folder / name, merged / name)
        fold_of: dict[str, int] = {}
        for f in self.folds:
            validation = model_folder / f"fold_{f}" / "validation"
            if not validation.is_dir():
                raise RuntimeError(f"fold {f} of model {model_folder} is missing (no {validation}): train it, with "
                                   "its final validation")
            for p in sorted(validation.iterdir()):
                if not (p.is_file() and p.name.endswith(file_ending)):
                    continue
                if p.name in fold_of:
                    raise RuntimeError(f"folds {fold_of[p.name]} and {f} of {model_folder} both predict {p.name}")
                fold_of[p.name] = f
                if self.overwrite or not (merged / p.name).is_file():
                    shutil.copy(p, merged / p.name)

    def _ensemble(self, model_folders: list[Path], out: Path, setup: tuple[Any, Any, dict[str, Any]]) -> None:
        """Average the models' ``--npz`` probabilities per case with nnU-Net's ``merge_files`` (as
        ``ensemble_crossvalidations``)."""
        from nnunetv2.ensembling.ensemble import merge_files

        rw, labels, dataset_json = setup
        mappings: list[dict[str, Path]] = []
        for model in model_folders:
            files: dict[str, Path] = {}
            for f in self.folds:
                validation = model / f"fold_{f}" / "validation"
                if not validation.is_dir():
                    raise RuntimeError(f"fold {f} of model {model} is missing: train every requested fold")
                npz = sorted(p for p in validation.iterdir() if p.name.endswith(".npz"))
                if not npz:
                    raise RuntimeError(f"no .npz files in {validation}: ensembles need the probabilities; rerun the "
                                       "final validation with --npz (fednnunet run train ... --val --npz)")
                for p in npz:
                    if p.name in files:
                        raise RuntimeError(f"case {p.name[:-4]} is in more than one fold of {model}")
                    files[p.name] = p
            mappings.append(files)
        for model, files in zip(model_folders[1:], mappings[1:]):
            if set(files) != set(mappings[0]):
                diff = sorted(set(files) ^ set(mappings[0]))
                raise RuntimeError(f"{model_folders[0].name} and {model.name} do not hold probabilities of the same "
                                   f"cases (differ in {', '.join(d[:-4] for d in diff)})")
        out.mkdir(parents=True, exist_ok=True)
        names = sorted(mappings[0])
        if not self.overwrite:
            names = [n for n in names if not (out / (n[:-4] + dataset_json["file_ending"])).is_file()]
        starmap(merge_files, [([str(m[n]) for m in mappings], str(out / n[:-4]), dataset_json["file_ending"], rw,
                               labels, False) for n in names], self.num_processes)
        for name in ("plans.json", "dataset.json"):
            shutil.copy(model_folders[0] / name, out / name)

    # --- 2. postprocessing search ------------------------------------------------------------------------------
    def _steps(self, labels: Any) -> list[tuple[str, dict[str, Any]]]:
        """determine_postprocessing's steps: all foreground, then each class or region if there are several."""
        from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

        regions = labels.foreground_regions if labels.has_regions else labels.foreground_labels
        steps = [("foreground", {"labels_or_regions": labels.foreground_labels})]
        if len(regions) > 1:
            steps += [(label_or_region_to_key(r), {"labels_or_regions": r}) for r in regions]
        return steps

    def postprocess(self, request: CvPostprocess) -> CvPostprocessReply:
        """Try step ``request.step`` on the current predictions; ``keep_previous`` settles the step before."""
        from nnunetv2.postprocessing.remove_connected_components import (
            load_postprocess_save, remove_all_but_largest_component_from_segmentation)

        step = request.step
        if step == 0:
            best = self.candidates.get(request.candidate)
            if best is None:
                raise RuntimeError(f"unknown model or ensemble {request.candidate!r}")
            self._best, self._source, self._pending, self._kept, self._decided = best, best.folder, None, [], []
            shutil.rmtree(best.folder / "postprocessed" / _TEMP, ignore_errors=True)
        else:
            self._settle(request.keep_previous, step - 1)
        best = self._best
        if best is None or self._source is None:
            raise RuntimeError("postprocessing step requested before its first step")
        setup = self._label_setup(best.folder)
        rw, labels, dataset_json = setup
        steps = self._steps(labels)
        if step >= len(steps):
            raise RuntimeError(f"postprocessing has {len(steps)} step(s) here, the server asked for step {step}")
        target, kwargs = steps[step]
        out = best.folder / "postprocessed" / _TEMP / ("keep_largest_fg" if step == 0 else
                                                       "keep_largest_perClassOrRegion")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        files = sorted(p.name for p in best.folder.iterdir()
                       if p.is_file() and p.name.endswith(dataset_json["file_ending"]))
        fn = remove_all_but_largest_component_from_segmentation
        starmap(load_postprocess_save, [(str(self._source / f), str(out / f), rw, [fn], [kwargs]) for f in files],
                self.num_processes)
        sums, _ = self._evaluate_folder(self._gt_segmentations(), out, setup)
        self._pending = (step, out, kwargs)
        return CvPostprocessReply(step=step, target=target, steps=[s for s, _ in steps], sums=sums.to_json())

    def _settle(self, keep: bool | None, step: int) -> None:
        """The server's decision on the pending step: kept predictions become the current ones."""
        if self._pending is None or self._pending[0] != step:
            raise RuntimeError(f"no pending postprocessing step {step} to settle")
        if not isinstance(keep, bool):
            raise RuntimeError(f"the decision on postprocessing step {step} is missing")
        _, out, kwargs = self._pending
        self._pending = None
        self._decided.append(keep)
        if not keep:
            return
        if step > 0:  # determine_postprocessing keeps the best per-class result under its own name
            best = out.parent / "keep_largest_perClassOrRegion_currentBest"
            shutil.rmtree(best, ignore_errors=True)
            shutil.move(str(out), str(best))
            out = best
        self._source = out
        self._kept.append(kwargs)

    # --- 3. write nnU-Net's files ------------------------------------------------------------------------------
    def finish(self, decision: CvFinish) -> CvFinishReply:
        from batchgenerators.utilities.file_and_folder_operations import save_json, save_pickle
        from nnunetv2.evaluation.find_best_configuration import print_inference_instructions
        from nnunetv2.postprocessing.remove_connected_components import (
            remove_all_but_largest_component_from_segmentation)
        from nnunetv2.utilities.json_export import recursive_fix_for_json_export

        best = self._best
        if best is None or best.key != decision.best:
            raise RuntimeError(f"the server chose {decision.best!r}, but this site searched the "
                               f"postprocessing of {best.key if best else 'nothing'}")
        self._settle(decision.keep_last, len(self._decided))
        if self._decided != decision.kept:
            raise RuntimeError(f"postprocessing decisions differ: this site settled {self._decided}, the server "
                               f"decided {decision.kept}")
        assert self._source is not None
        output_folder = best.folder / "postprocessed"
        for p in self._source.iterdir():  # as determine_postprocessing: every file of the final predictions
            if p.is_file():
                shutil.copy(p, output_folder / p.name)
        fns = [remove_all_but_largest_component_from_segmentation] * len(self._kept)
        pkl = best.folder / "postprocessing.pkl"
        save_pickle((fns, list(self._kept)), str(pkl))
        record = {"input_folder": decision.before, "postprocessed": decision.after,
                  "postprocessing_fns": [f.__name__ for f in fns], "postprocessing_kwargs": list(self._kept)}
        recursive_fix_for_json_export(record)
        save_json(record, str(best.folder / "postprocessing.json"))
        shutil.rmtree(output_folder / _TEMP, ignore_errors=True)

        info = {
            "folds": list(self.folds), "dataset_name_or_id": self.dataset_name, "considered_models": self.models,
            "ensembling_allowed": self.allow_ensembling, "all_results": dict(decision.all_results),
            "best_model_or_ensemble": {
                "result_on_crossval_pre_pp": decision.result_on_crossval_pre_pp,
                "result_on_crossval_post_pp": decision.result_on_crossval_post_pp,
                "postprocessing_file": str(pkl), "some_plans_file": str(best.folder / "plans.json"),
                "selected_model_or_models": selected_models(best.key)}}
        results = self._results()
        save_json(info, str(results / "inference_information.json"))
        instructions = results / "inference_instructions.txt"
        print_inference_instructions(info, instructions_file=str(instructions))
        federated = results / FEDERATED_DECISION_FILE
        write_json_atomic(federated, {"site": self.site, **asdict(decision)})
        return CvFinishReply(dataset_name=self.dataset_name,
                             inference_information=str(results / "inference_information.json"),
                             instructions_file=str(instructions), instructions=instructions.read_text(),
                             postprocessing_file=str(pkl), federated_decision=str(federated))
