"""Aggregation core: FedAvg, AsymFedAvg and validation of site updates (pure numpy).

Updates are ``dict[str, np.ndarray]`` (parameter name -> array, alias keys already removed).
"""

from fednnunet.aggregation.fedavg import (
    AsymReport,
    SiteAsymStats,
    StreamingAverager,
    asym_fedavg,
    fedavg,
)
from fednnunet.aggregation.validation import (
    ModelSpec,
    UpdateRejected,
    validate_metrics,
    validate_update,
)

__all__ = [
    "AsymReport",
    "ModelSpec",
    "SiteAsymStats",
    "StreamingAverager",
    "UpdateRejected",
    "asym_fedavg",
    "fedavg",
    "validate_metrics",
    "validate_update",
]
