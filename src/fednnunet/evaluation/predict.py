"""Predict held-out cases with nnU-Net's own predictor, from ordinary nnU-Net results folders.

Why nnU-Net's ``nnUNetPredictor`` and nothing of our own: the federation leaves stock results folders
(``<trainer>__<plans>__<configuration>/fold_X/checkpoint_final.pth``, see ``fednnunet.training.site_trainer``), so the
numbers we report are those ``nnUNetv2_predict`` would give: same preprocessing, sliding window with Gaussian
weighting, resampling back to the original geometry, and, when several folds are given, nnU-Net's fold
ensemble (softmax averaged over the folds' checkpoints, ``initialize_from_trained_model_folder(use_folds=...)``).
That is how the paper evaluates external sites (five-fold ensemble).

Environment: ``nnunetv2.paths`` reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` once, when it
is first imported, so every nnU-Net import here is inside a function. Prediction itself does not need these
variables (the model folder and the input files are given explicitly), but other code in the same process may.

Worker processes: ``predict_from_files`` starts one preprocessing process and one export pool with the
``spawn`` method, which re-imports the caller's ``__main__`` (guard scripts with ``if __name__ == "__main__":``)
and costs a few seconds of start-up each (importing torch). ``sequential=True`` uses nnU-Net's
``predict_from_files_sequential`` instead: no extra processes, identical predictions; better for a handful of
small cases on a small CPU machine.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)

__all__ = ["predict_cases", "held_out_cases", "case_input_files", "normalize_folds"]


def normalize_folds(folds: Sequence[int | str] | int | str) -> list[int | str]:
    """Folds as nnU-Net's predictor takes them: integers, or the string ``'all'``.

    Accepts ``"0 1 2"`` style strings too, as a CLI hands them over.
    """
    if isinstance(folds, (int, str)) and not (isinstance(folds, str) and " " in folds.strip()):
        folds = [folds]
    elif isinstance(folds, str):
        folds = folds.split()
    out: list[int | str] = []
    for f in folds:
        if isinstance(f, bool):
            raise ValueError(f"fold must be an integer or 'all', got {f!r}")
        if f == "all":
            out.append("all")
            continue
        try:
            out.append(int(f))
        except (TypeError, ValueError):
            raise ValueError(f"fold must be an integer or 'all', got {f!r}") from None
    if not out:
        raise ValueError("at least one fold is needed")
    if len(set(out)) != len(out):
        raise ValueError(f"folds contain duplicates: {out}")
    return out


def held_out_cases(preprocessed_dataset_folder: str | os.PathLike[str], fold: int | str) -> list[str]:
    """Case ids of ``fold``'s validation split, read from nnU-Net's ``splits_final.json``.

    Why from that file: nnU-Net's trainer writes it on the first training of the dataset (5-fold KFold with
    seed 12345, or a user-provided file) and every fold's training reads it, so these are exactly the cases the
    fold's model never trained on. No nnU-Net import, so it works in any process.

    Raises:
        ValueError: ``fold == 'all'`` (trained on every case: there is nothing held out; evaluate such a model on
            external sites only), or the fold is not in the file.
        FileNotFoundError: no ``splits_final.json`` yet (no fold of the dataset has been trained).
    """
    if fold == "all":
        raise ValueError("fold 'all' is trained on every case, so it has no held-out cases; "
                         "evaluate it on external data instead")
    (fold,) = normalize_folds([fold])
    path = Path(preprocessed_dataset_folder) / "splits_final.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: nnU-Net writes it when the first fold of the dataset "
                                "is trained")
    splits = json.loads(path.read_text())
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} is not in {path} ({len(splits)} folds)")
    return sorted(str(k) for k in splits[fold]["val"])


def case_input_files(raw_dataset_folder: str | os.PathLike[str],
                     case_ids: Sequence[str] | None = None) -> list[list[str]]:
    """Image files per case (one per channel, in channel order) of a raw nnU-Net dataset's training cases.

    Uses nnU-Net's ``get_filenames_of_train_images_and_targets``, which honours a ``"dataset"`` entry in
    ``dataset.json`` as well as the usual ``imagesTr/<case>_XXXX<ending>`` layout. ``case_ids`` selects and orders
    the cases (e.g. from :func:`held_out_cases`); None takes all, sorted.

    Raises:
        KeyError: a requested case is not in the dataset.
    """
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folder = Path(raw_dataset_folder)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    files = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    ids = sorted(files) if case_ids is None else [str(c) for c in case_ids]
    missing = [c for c in ids if c not in files]
    if missing:
        raise KeyError(f"{len(missing)} case(s) not in {folder}: {missing[:5]}")
    return [[str(p) for p in files[c]["images"]] for c in ids]


def _case_id(first_channel_file: str, file_ending: str) -> str:
    """nnU-Net's own rule (``_manage_input_and_output_lists``): strip ``_XXXX`` and the file ending."""
    return os.path.basename(first_channel_file)[: -(len(file_ending) + 5)]


def predict_cases(
    model_folder: str | os.PathLike[str],
    folds: Sequence[int | str] | int | str,
    input_files: list[list[str]] | str | os.PathLike[str],
    output_folder: str | os.PathLike[str],
    device: str = "cpu",
    checkpoint: str = "checkpoint_final.pth",
    tta: bool = False,
    sequential: bool = False,
    tile_step_size: float = 0.5,
) -> list[Path]:
    """Segments ``input_files`` with the (ensemble of the) given folds of a trained nnU-Net model.

    Args:
        model_folder: ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>`` (holds ``plans.json``,
            ``dataset.json`` and ``fold_X/``).
        folds: one fold, or several for nnU-Net's fold ensemble; ``'all'`` for a model trained on every case.
        input_files: a list of cases, each the list of its channel files (``[[case_0000.nii.gz], ...]``), or a
            folder of ``<case>_XXXX<ending>`` files (as ``nnUNetv2_predict -i``).
        output_folder: receives ``<case><file_ending>`` per case (plus nnU-Net's ``dataset.json``,
            ``plans.json`` and ``predict_from_raw_data_args.json``). Existing predictions are overwritten.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        checkpoint: checkpoint file name in each fold folder.
        tta: test-time augmentation by mirroring (``nnUNetv2_predict`` default: on; ``--disable_tta`` turns it
            off). Default here **False**: mirroring multiplies inference time by up to 8 (3D) / 4 (2D) and the
            comparison between methods stays fair as long as every method is predicted the same way. Pass
            ``tta=True`` for numbers comparable with stock nnU-Net predictions.
        sequential: use nnU-Net's ``predict_from_files_sequential`` (no worker processes); otherwise
            ``predict_from_files`` with one preprocessing and one export worker.
        tile_step_size: sliding-window step as a fraction of the patch size (nnU-Net default 0.5).

    Returns:
        the written segmentation files, one per input case, in input order.

    Raises:
        FileNotFoundError: the model folder, a fold's checkpoint, or the input folder is missing.
        ValueError: bad folds, or no input cases.
        RuntimeError: nnU-Net did not write a prediction for some case.
    """
    model_folder = Path(model_folder)
    output_folder = Path(output_folder)
    fold_list = normalize_folds(folds)
    for name in ("plans.json", "dataset.json"):
        if not (model_folder / name).is_file():
            raise FileNotFoundError(f"{model_folder / name} is missing: not an nnU-Net results folder")
    for f in fold_list:
        ckpt = model_folder / f"fold_{f}" / checkpoint
        if not ckpt.is_file():
            raise FileNotFoundError(f"fold {f} has no {checkpoint} in {model_folder} (is its training finished?)")

    file_ending = json.loads((model_folder / "dataset.json").read_text())["file_ending"]
    if isinstance(input_files, (str, os.PathLike)):
        input_folder = Path(input_files)
        if not input_folder.is_dir():
            raise FileNotFoundError(f"input folder {input_folder} does not exist")
        from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

        cases = create_lists_from_splitted_dataset_folder(str(input_folder), file_ending, num_processes=1)
    else:
        cases = [[os.fspath(p) for p in case] for case in input_files]
    if not cases:
        raise ValueError("no input cases to predict")
    case_ids = [_case_id(c[0], file_ending) for c in cases]
    if len(set(case_ids)) != len(case_ids):
        raise ValueError(f"input case ids are not unique: {case_ids}")

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    start = time.perf_counter()
    output_folder.mkdir(parents=True, exist_ok=True)  # predict_from_files_sequential does not create it
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=bool(tta),
                                perform_everything_on_device=True, device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=tuple(fold_list),
                                                   checkpoint_name=checkpoint)
    truncated = [str(output_folder / c) for c in case_ids]
    if sequential:
        predictor.predict_from_files_sequential(cases, truncated, save_probabilities=False, overwrite=True)
    else:
        predictor.predict_from_files(cases, truncated, save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
    outputs = [output_folder / (c + file_ending) for c in case_ids]
    missing = [p.name for p in outputs if not p.is_file()]
    if missing:
        raise RuntimeError(f"nnU-Net wrote no prediction for {len(missing)} case(s): {missing[:5]}")
    logger.info("predicted %d case(s) with %s folds %s (tta=%s) into %s in %.1f s", len(outputs), model_folder.name,
                fold_list, tta, output_folder, time.perf_counter() - start)
    return outputs
