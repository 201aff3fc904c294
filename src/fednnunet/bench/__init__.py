"""Benchmarks of issue 6, as library functions (the ``fednnunet bench ...`` commands print them).

* :func:`bench_aggregate` (``aggregate.py``): time and server peak memory of aggregating K site updates,
  FFE (FedAvg with :class:`~fednnunet.aggregation.StreamingAverager`) and AsymFedAvg (streaming with
  :class:`~fednnunet.aggregation.StreamingAsymAverager`, as the server does, and all at once with
  :func:`~fednnunet.aggregation.asym_fedavg` for comparison), against a plain copy of the same bytes timed in
  the same run. The ratio is the figure: absolute times vary between machines.
* :func:`bench_overhead` (``overhead.py``): per-round overhead and bytes on the wire of a real federation,
  with Flower's own floor measured in the same run (``flower_floor.py``: the same nodes and bytes, no work).
* :func:`bench_planning` (``planning.py``): ``fednnunet run plan_and_preprocess`` on K synthetic sites vs.
  each site's local ``nnUNetv2_plan_and_preprocess`` alone, same machine, same run.
* :func:`bench_site_epoch` (``site_epoch.py``): a site's epochs through nnU-Net's own training loop vs. the same
  epochs in a one-site federation: compute per epoch, wall time, peak memory.
* :func:`bench_checks` (``checks.py``, issue 16): a site's data checks vs. nnU-Net's fingerprint extraction on
  the same datasets, same process.

Benchmarks are not part of ``make test``; ``tests/test_bench_smoke.py`` only checks that they run and
return their keys. Nothing heavy is imported here (no torch, no nnU-Net): the planning bench runs both
tools as subprocesses.
"""

from fednnunet.bench.aggregate import bench_aggregate, format_aggregate_table, model_shapes
from fednnunet.bench.checks import bench_checks, format_checks
from fednnunet.bench.overhead import bench_overhead, format_overhead
from fednnunet.bench.planning import bench_planning, format_planning
from fednnunet.bench.site_epoch import bench_site_epoch, format_site_epoch

__all__ = ["bench_aggregate", "bench_checks", "bench_overhead", "bench_planning", "bench_site_epoch",
           "format_aggregate_table", "format_checks", "format_overhead", "format_planning", "format_site_epoch",
           "model_shapes"]
