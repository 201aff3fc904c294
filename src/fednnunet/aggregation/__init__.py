"""Aggregation core: FedAvg, AsymFedAvg and validation of site updates (pure numpy).

Updates are ``dict[str, np.ndarray]`` (parameter name -> array, alias keys already removed).
"""

from fednnunet.aggregation.fedavg import (
    AsymReport,
    SiteAsymStats,
    StreamingAsymAverager,
    StreamingAverager,
    asym_fedavg,
    fedavg,
)
from fednnunet.aggregation.ordered import SiteOrderedAdds
from fednnunet.aggregation.validation import (
    ModelSpec,
    UpdateRejected,
    validate_metrics,
    validate_update,
)
from fednnunet.aggregation.wire import WIRE_DTYPES, delta_to_wire, from_wire, narrows, to_wire, wire_spec

__all__ = [
    "AsymReport",
    "ModelSpec",
    "SiteAsymStats",
    "SiteOrderedAdds",
    "StreamingAsymAverager",
    "StreamingAverager",
    "UpdateRejected",
    "asym_fedavg",
    "fedavg",
    "validate_metrics",
    "validate_update",
    "WIRE_DTYPES",
    "delta_to_wire",
    "from_wire",
    "narrows",
    "to_wire",
    "wire_spec",
]
