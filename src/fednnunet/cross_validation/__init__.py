"""Federated ``nnUNetv2_find_best_configuration``: nnU-Net's choice of model, ensemble and postprocessing, made on
the sums of every site's cross-validation results without pooling a case.

The stage's two halves sit side by side and talk only through :mod:`fednnunet.protocol` (``CvEvaluate``,
``CvPostprocess``, ``CvFinish`` and their replies):

* coordinator half: :mod:`~fednnunet.cross_validation.coordinator` (the options, the round trips, nnU-Net's
  decisions on the pooled sums, ``cross_validation.json`` and ``best_configuration.json``);
* site half: :mod:`~fednnunet.cross_validation.site_ops` (the operations the site worker dispatches) and
  :mod:`~fednnunet.cross_validation.site` (the scoring, ensembling, postprocessing and nnU-Net's files at a site);
* both halves: :mod:`~fednnunet.cross_validation.aggregates` (``MetricSums``: what crosses the wire, and nnU-Net's
  decision rules; pure);
* the coordinator's tables: :mod:`~fednnunet.cross_validation.report` (every site's and the pooled summaries, also
  of a federated training's final validations).

The CLI's flags and printing are at the CLI edge, in :mod:`fednnunet.cli_cross_validation`.
"""
