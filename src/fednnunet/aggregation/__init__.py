"""Aggregation core: FedAvg, AsymFedAvg, the strategies the training loop calls, and validation of site updates
(pure numpy).

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
from fednnunet.aggregation.robust import clip_update, update_norm
from fednnunet.aggregation.site_weights import FixedWeights, SiteReplyError, fix_site_weights
from fednnunet.aggregation.strategy import AggregationStrategy, aggregation_strategy
from fednnunet.aggregation.validation import (
    ModelSpec,
    UpdateRejected,
    validate_metrics,
    validate_update,
)
from fednnunet.aggregation.wire import WIRE_DTYPES, delta_to_wire, from_wire, narrows, to_wire, wire_spec

__all__ = [
    "AggregationStrategy",
    "AsymReport",
    "FixedWeights",
    "ModelSpec",
    "SiteAsymStats",
    "SiteOrderedAdds",
    "SiteReplyError",
    "StreamingAsymAverager",
    "StreamingAverager",
    "UpdateRejected",
    "aggregation_strategy",
    "asym_fedavg",
    "clip_update",
    "fedavg",
    "fix_site_weights",
    "update_norm",
    "validate_metrics",
    "validate_update",
    "WIRE_DTYPES",
    "delta_to_wire",
    "from_wire",
    "narrows",
    "to_wire",
    "wire_spec",
]
