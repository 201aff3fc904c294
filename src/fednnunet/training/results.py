"""A site's final reply (``train_finish``, or ``train_validate`` for ``--val``) as the job's ``result.json`` holds it.

Why not the reply's own fields: ``result.json`` (and the cross-validation table built from it,
``fednnunet.cross_validation.report.training_cv``) keeps the layout it had before the replies were typed: the
validation entries only when a validation summary exists, and who answered and when after what the site reports.
"""

from __future__ import annotations

from typing import Any

from fednnunet.protocol.codec import encode
from fednnunet.protocol.messages import TrainFinishReply, TrainValidateReply

__all__ = ["site_result"]


def site_result(reply: TrainValidateReply) -> dict[str, Any]:
    """The record of one site's final model: its folder (and checkpoint), its final validation, its timings."""
    finished = isinstance(reply, TrainFinishReply)
    record: dict[str, Any] = {"output_folder": reply.output_folder}
    if finished:
        record["checkpoint"] = reply.checkpoint
    if reply.validation_summary is not None:
        record.update(validation_summary=reply.validation_summary, validation_mean_dice=reply.validation_mean_dice,
                      validation_sums=reply.validation_sums)
    if finished:
        record["peak_rss_bytes"] = reply.peak_rss_bytes
        if reply.personal is not None:  # the site's own model beside the federation's (training/personal.py)
            record["personal"] = encode(reply.personal)
    record.update(site=reply.site, seconds=reply.seconds, received_at=reply.received_at,
                  replied_at=reply.replied_at)
    return record
