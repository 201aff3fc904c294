"""Where an aggregation algorithm plugs into the training loop: the :class:`AggregationStrategy` protocol.

Why a seam: the fold loop (``fednnunet.training.fold_loop``) sends the models, checks every site's update as it
arrives, leaves sites out and saves the server state after every round; what becomes of the checked updates is the
algorithm's business. A new algorithm is a class here and a line in :func:`aggregation_strategy`, not an edit of
the loop. The loop calls, every round, :meth:`~AggregationStrategy.start_round`, then
:meth:`~AggregationStrategy.add` for each accepted update (in site order when seeded: ``SiteOrderedAdds``), then
:meth:`~AggregationStrategy.apply`; :meth:`~AggregationStrategy.saved_models` for every save, and
:meth:`~AggregationStrategy.restore` once on ``--resume``.

The implementations are the streaming averagers of ``fedavg.py`` and the server momentum of ``momentum.py``, called
exactly as before (the same floating-point operations in the same order: seeded runs stay bit for bit):

* :class:`FedAvg` (FFE, every site has the same network): one global model, into whose arrays the average is
  written;
* :class:`FedAvgM` (FFE with ``--server-momentum``): FedAvg's average taken as a momentum step; the velocity is
  saved with the model;
* :class:`FedBN` (FFE with ``--local-norm``): FedAvg on everything but the normalization layers, whose weights
  every site keeps;
* :class:`AsymFedAvg` (``--asym``, every site planned alone): one model per site, compatible layers averaged.

Pure numpy, no Flower: tested without a network.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol, cast

import numpy as np

from fednnunet.aggregation.fedavg import Scope, StreamingAsymAverager, StreamingAverager
from fednnunet.aggregation.momentum import MOMENTUM_PREFIX, ServerMomentum
from fednnunet.aggregation.validation import ModelSpec

__all__ = ["GLOBAL", "AggregationStrategy", "AsymFedAvg", "FedAvg", "FedAvgM", "FedBN", "aggregation_strategy",
           "check_strategy_options"]

Arrays = dict[str, np.ndarray]

#: The key of FFE's one model (every site trains from it), in the server's models and its saved state.
GLOBAL = "global"
#: Name prefix of the server momentum's velocity in a saved FFE state (beside the global model's arrays).
VELOCITY_PREFIX = "server_velocity/"


class AggregationStrategy(Protocol):
    """What the fold loop asks of an aggregation algorithm. ``models`` are the server's models, by key."""

    def model_key(self, site: str) -> str:
        """The key of the model ``site`` trains from (and whose change its update holds)."""
        ...

    def initial_models(self, init_weights: Mapping[str, Arrays], sites: Sequence[str]) -> dict[str, Arrays]:
        """The models before round 1, from the sites' initial weights (``train_init`` replies)."""
        ...

    def start_round(self) -> None:
        """Forget the previous round's updates."""
        ...

    def add(self, site: str, weights: Arrays, weight: float) -> None:
        """Add one site's checked update (in the model's own dtypes) with its FedAvg weight; the arrays are read
        until :meth:`apply` and must not change before."""
        ...

    def apply(self, models: dict[str, Arrays]) -> dict[str, Any]:
        """Update ``models`` from the round's updates; return the fields this algorithm adds to the round record."""
        ...

    def saved_models(self, models: Mapping[str, Arrays]) -> dict[str, Arrays]:
        """What a round's state file holds: the models and the algorithm's own state."""
        ...

    def restore(self, models: dict[str, Arrays]) -> None:
        """On ``--resume``: take the algorithm's own state out of the loaded :meth:`saved_models`, leaving the
        models."""
        ...


class StrategyOptions(Protocol):
    """The training options an algorithm is chosen by (``fednnunet.training.options.TrainOptions``)."""

    asym_scope: str
    server_momentum: float
    local_norm: bool


def check_strategy_options(asym: bool, options: StrategyOptions) -> None:
    """Raise ``ValueError`` for options no algorithm takes (before any site builds a trainer for the run)."""
    if asym and options.server_momentum:
        raise ValueError("--server-momentum applies to FFE's global model; AsymFedAvg has none")
    if asym and options.local_norm:
        raise ValueError("--local-norm applies to FFE; with --asym every site keeps what other sites' networks "
                         "do not share already")
    if options.local_norm and options.server_momentum:
        raise ValueError("--local-norm and --server-momentum are not implemented together: choose one")


def aggregation_strategy(asym: bool, options: StrategyOptions, specs: Mapping[str, ModelSpec],
                         normalization: Sequence[str] = ()) -> AggregationStrategy:
    """The algorithm of a run: ``specs`` are the sites' networks (from their initial weights), in site order;
    ``normalization`` the weights of the networks' normalization layers (the first site's ``train_init`` reply;
    ``check_site_infos`` holds the other sites to the same list).

    FedAvg needs one network at every site: sites whose networks differ are refused (``ValueError``)."""
    check_strategy_options(asym, options)
    if asym:
        return AsymFedAvg(specs, options.asym_scope)
    _check_one_network(specs)
    if options.local_norm:
        return FedBN(list(specs), _local_weights(normalization, next(iter(specs.values()))))
    return FedAvgM(options.server_momentum) if options.server_momentum else FedAvg()


def _local_weights(normalization: Sequence[str], spec: ModelSpec) -> frozenset[str]:
    """What ``--local-norm`` keeps at the sites: the normalization layers' weights, and their SGD momentum buffers
    when those travel too (``--momentum average``)."""
    if not normalization:
        raise ValueError("--local-norm: the sites' network has no normalization layer (batch, instance, group or "
                         "layer norm), so there is nothing to keep local")
    unknown = sorted(set(normalization) - set(spec.params))
    if unknown:
        raise ValueError(f"--local-norm: the sites name normalization weights their network does not have: "
                         f"{', '.join(unknown[:3])}")
    return frozenset(normalization) | {MOMENTUM_PREFIX + n for n in normalization if MOMENTUM_PREFIX + n in spec.params}


class FedAvg:
    """FedAvg on one global model; one averager for the run (its float64 sums stay allocated round to round)."""

    def __init__(self) -> None:
        self._averager = StreamingAverager()

    def model_key(self, site: str) -> str:
        return GLOBAL

    def initial_models(self, init_weights: Mapping[str, Arrays], sites: Sequence[str]) -> dict[str, Arrays]:
        # the first site's weights, copied: received arrays are read-only views of the reply, and the average is
        # written into the global model's own arrays
        return {GLOBAL: {k: np.array(v) for k, v in init_weights[sites[0]].items()}}

    def start_round(self) -> None:
        self._averager.reset()

    def add(self, site: str, weights: Arrays, weight: float) -> None:
        self._averager.add(weights, weight)

    def apply(self, models: dict[str, Arrays]) -> dict[str, Any]:
        # into the global model's own arrays (out=): no new 4 bytes per parameter every round
        models[GLOBAL] = self._averager.result(out=models[GLOBAL])
        return {}

    def saved_models(self, models: Mapping[str, Arrays]) -> dict[str, Arrays]:
        return dict(models)

    def restore(self, models: dict[str, Arrays]) -> None:
        _check_one_model(models)
        _take_velocity(models)  # saved by a run with server momentum: not this run's


class FedAvgM(FedAvg):
    """FedAvg with server momentum (FedAvgM): the global model takes a momentum step towards the round's average."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.momentum = ServerMomentum(beta)

    def apply(self, models: dict[str, Arrays]) -> dict[str, Any]:
        self.momentum.step(models[GLOBAL], self._averager.result())
        return {}

    def saved_models(self, models: Mapping[str, Arrays]) -> dict[str, Arrays]:
        velocity = {VELOCITY_PREFIX + k: v for k, v in self.momentum.velocity.items()}
        return {GLOBAL: {**models[GLOBAL], **velocity}}

    def restore(self, models: dict[str, Arrays]) -> None:
        _check_one_model(models)
        self.momentum = ServerMomentum(self.momentum.beta, _take_velocity(models))


class FedBN:
    """FedBN (Li et al., ICLR 2021): FedAvg on every weight but the normalization layers', which each site keeps.

    Why: a site whose images differ (scanner, camera, crop) can keep its own scale and shift after each
    normalization while the convolutions are shared. Every site trains from its own model: the global weights with
    its own normalization. The server also keeps the plain FedAvg of everything (``GLOBAL``, normalization weights
    averaged like the rest): it is what the coordinator exports for a hospital outside the federation, which has no
    normalization of its own to bring, and the average is the one the sites' normalizations were all pulled towards
    by sharing the layers around them.

    A site's model shares the arrays of the global model that it does not keep (no copy per site); only its
    normalization weights are its own. The saved state holds the global model and each site's normalization."""

    def __init__(self, sites: Sequence[str], local: Collection[str]) -> None:
        self._sites = list(sites)
        self._local = frozenset(local)
        self._averager = StreamingAverager()
        self._kept: dict[str, Arrays] = {}  # this round's normalization weights, by site (read until apply)

    def model_key(self, site: str) -> str:
        return site

    def initial_models(self, init_weights: Mapping[str, Arrays], sites: Sequence[str]) -> dict[str, Arrays]:
        shared = {k: np.array(v) for k, v in init_weights[sites[0]].items()}  # FedAvg's start: the first site's
        return {GLOBAL: shared, **{s: self._site_model(shared, {k: np.array(shared[k]) for k in self._local})
                                   for s in sites}}

    def start_round(self) -> None:
        self._averager.reset()
        self._kept = {}

    def add(self, site: str, weights: Arrays, weight: float) -> None:
        self._averager.add(weights, weight)
        self._kept[site] = {k: weights[k] for k in self._local}

    def apply(self, models: dict[str, Arrays]) -> dict[str, Any]:
        models[GLOBAL] = self._averager.result(out=models[GLOBAL])
        for site in self._sites:  # a site left out of the round keeps its normalization
            own = ({k: np.array(a) for k, a in self._kept[site].items()} if site in self._kept
                   else {k: models[site][k] for k in self._local})
            models[site] = self._site_model(models[GLOBAL], own)
        self._kept = {}
        return {}

    def _site_model(self, shared: Arrays, own: Arrays) -> Arrays:
        """The global arrays (not copied) with the site's own normalization weights, in the network's order."""
        return {k: own[k] if k in self._local else a for k, a in shared.items()}

    def saved_models(self, models: Mapping[str, Arrays]) -> dict[str, Arrays]:
        return {GLOBAL: models[GLOBAL], **{s: {k: models[s][k] for k in self._local} for s in self._sites}}

    def restore(self, models: dict[str, Arrays]) -> None:
        missing = [s for s in self._sites if s not in models]
        if missing:
            raise ValueError(f"the saved state has no normalization weights of site(s) {', '.join(missing)}: it is "
                             "from a run without --local-norm, or with other sites")
        for s in self._sites:
            if set(models[s]) != self._local:
                raise ValueError(f"the saved normalization weights of site {s} are not this network's")
            models[s] = self._site_model(models[GLOBAL], models[s])


class AsymFedAvg:
    """AsymFedAvg: every site keeps its own model; layers compatible across sites are averaged (``scope``)."""

    def __init__(self, specs: Mapping[str, ModelSpec], scope: str) -> None:
        self._averager = StreamingAsymAverager(specs, cast(Scope, scope))  # "all" or "any": TrainOptions checks

    def model_key(self, site: str) -> str:
        return site

    def initial_models(self, init_weights: Mapping[str, Arrays], sites: Sequence[str]) -> dict[str, Arrays]:
        return dict(init_weights)

    def start_round(self) -> None:
        self._averager.reset()

    def add(self, site: str, weights: Arrays, weight: float) -> None:
        self._averager.add(site, weights, weight)

    def apply(self, models: dict[str, Arrays]) -> dict[str, Any]:
        # every site that delivered gets its new model (averaged groups shared); sites left out keep theirs
        new, report = self._averager.result()
        models.update(new)
        return {"asym_fraction_averaged": {s: st.fraction_averaged for s, st in report.sites.items()}}

    def saved_models(self, models: Mapping[str, Arrays]) -> dict[str, Arrays]:
        return dict(models)

    def restore(self, models: dict[str, Arrays]) -> None:
        pass  # nothing of its own: the models are the whole state


def _check_one_model(models: Mapping[str, Arrays]) -> None:
    if set(models) != {GLOBAL}:
        raise ValueError("the saved state keeps per-site normalization weights: it is from a run with --local-norm")


def _take_velocity(models: dict[str, Arrays]) -> Arrays:
    """The server momentum's velocity, removed from the loaded global model (empty if none was saved)."""
    model = models[GLOBAL]
    return {k[len(VELOCITY_PREFIX):]: model.pop(k) for k in list(model) if k.startswith(VELOCITY_PREFIX)}


def _check_one_network(specs: Mapping[str, ModelSpec]) -> None:
    sites = list(specs)
    first = sites[0]
    for s in sites[1:]:
        a, b = specs[first], specs[s]
        for name in list(a.params) + [n for n in b.params if n not in a.params]:
            if a.params.get(name) != b.params.get(name):
                raise ValueError(f"sites {first} and {s} have different networks ({name}: {a.params.get(name)} vs "
                                 f"{b.params.get(name)}); FedAvg needs identical plans: plan with FFE, or train with "
                                 "--asym")
