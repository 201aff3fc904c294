"""Evaluation of segmentations: Dice (DSC) and 95th-percentile Hausdorff distance (HD95).

`fednnunet.evaluation.metrics` holds the metrics for one pair of masks, one case (several classes) and
a folder of nnU-Net label files read with nnU-Net's own reader/writer.
"""

from fednnunet.evaluation.metrics import (
    dice,
    evaluate_case,
    evaluate_folder,
    hd95,
    reader_from_dataset_json,
)

__all__ = ["dice", "hd95", "evaluate_case", "evaluate_folder", "reader_from_dataset_json"]
