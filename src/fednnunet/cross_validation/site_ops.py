"""The site's three find_best_configuration operations, as the site worker dispatches them.

Each takes its typed request and returns its typed reply (no arrays travel in this stage); the work and the state
between requests are in :class:`~fednnunet.cross_validation.site.SiteCrossValidation`, which the worker holds from
``cv_evaluate`` to ``cv_finish``. A request that needs that state when the worker has none (it restarted, or
``cv_evaluate`` was never sent) fails as a lost session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fednnunet.cross_validation.site import SiteCrossValidation
from fednnunet.protocol.errors import ErrorKind, OpError
from fednnunet.protocol.messages import (CvEvaluate, CvEvaluateReply, CvFinish, CvFinishReply, CvPostprocess,
                                         CvPostprocessReply)

if TYPE_CHECKING:  # pragma: no cover - the worker imports this module, not the other way round
    from fednnunet.site.worker import SiteWorker

Arrays = dict[str, np.ndarray]


def cv_evaluate(worker: SiteWorker, request: CvEvaluate, arrays: Arrays) -> tuple[CvEvaluateReply, Arrays]:
    """Score this site's cross-validation predictions of every model and ensemble; reply only sums."""
    worker.check_task(request.task)
    worker.cross_validation = SiteCrossValidation(worker.site, worker.dataset, request)
    return worker.cross_validation.evaluate(), {}


def cv_postprocess(worker: SiteWorker, request: CvPostprocess, arrays: Arrays
                   ) -> tuple[CvPostprocessReply, Arrays]:
    """Try one step of the postprocessing search (settling the previous one)."""
    return _session(worker).postprocess(request), {}


def cv_finish(worker: SiteWorker, request: CvFinish, arrays: Arrays) -> tuple[CvFinishReply, Arrays]:
    """Write nnU-Net's find_best_configuration files from the coordinator's decision; the session ends here."""
    session, worker.cross_validation = _session(worker), None
    return session.finish(request), {}


def _session(worker: SiteWorker) -> SiteCrossValidation:
    if worker.cross_validation is None:
        raise OpError(ErrorKind.SESSION_LOST, f"site {worker.site}: no find_best_configuration in progress "
                                              "(cv_evaluate was not called, or the site worker restarted since)")
    return worker.cross_validation
