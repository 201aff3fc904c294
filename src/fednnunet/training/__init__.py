"""The training stage: federated nnU-Net training, its coordinator half and its site half side by side.

FedAvg on FFE plans (every site the same network, one global model) or AsymFedAvg on per-site plans (``--asym``:
every site its own model, compatible layers averaged). One round = ``epochs_per_round`` nnU-Net epochs at every
site, then aggregation; the two halves speak only through :mod:`fednnunet.protocol` (``TrainInit``, ``TrainRound``,
``TrainValidateDelivered``, ``TrainFinish``, ``TrainValidate``).

Coordinator half (no torch until the global model is written):

* :mod:`~fednnunet.training.task`: ``run_training_task``, the job: every fold, ``--val``, the cross-validation table;
* :mod:`~fednnunet.training.fold_loop`: one fold's rounds: send, check, aggregate, save, finish;
* :mod:`~fednnunet.training.options`: ``TrainOptions`` and the requests built from them;
* :mod:`~fednnunet.training.site_checks`: the sites' replies checked against the coordinator's own expectations;
* :mod:`~fednnunet.training.delivered`: the delivered model's validation and the federation's best model;
* :mod:`~fednnunet.training.state` and :mod:`~fednnunet.training.saver`: the server state saved every round
  (``--resume``), in the background;
* :mod:`~fednnunet.training.progress`: the round line, ``progress.png`` and where a round's time went;
* :mod:`~fednnunet.training.results`: the sites' final replies as ``result.json`` records them;
* :mod:`~fednnunet.training.export`: the FFE global model in nnU-Net's layout.

The algorithm that turns the updates into models is an :class:`~fednnunet.aggregation.strategy.AggregationStrategy`
(FedAvg, FedAvgM, AsymFedAvg).

Site half (imports torch and nnU-Net; loaded by the site worker only when a job trains):

* :mod:`~fednnunet.training.site_ops`: the worker's entry points, one per training request;
* :mod:`~fednnunet.training.session`: a site's side of a run (its trainer across the rounds);
* :mod:`~fednnunet.training.site_trainer`: nnU-Net's trainer kept alive between rounds;
* :mod:`~fednnunet.training.weights`: the network's state without nnU-Net's alias keys;
* :mod:`~fednnunet.training.personal`: a site's personal model, the final model fine-tuned on its own cases
  (``--finetune-epochs``; its plans name is used by the coordinator too).
"""
