"""Local normalization layers (issue 28, item 2: ``--local-norm``, FedBN): everything but the normalization layers'
weights is averaged; every site keeps its own normalization; the coordinator's global model has the averaged one.

Pure checks of the strategy and of the coordinator's fold loop over fake sites (hand-computed averages, a site left
out of a round, ``--resume``, refused combinations). The real federation is in test_personal.py (it shares that
module's planned sites)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fednnunet.aggregation import ModelSpec, aggregation_strategy
from fednnunet.aggregation.momentum import MOMENTUM_PREFIX
from fednnunet.aggregation.strategy import GLOBAL, FedBN
from fednnunet.protocol.errors import ErrorKind, SiteError
from fednnunet.training.options import TrainOptions
from fednnunet.training.state import load_models, load_state
from test_training import _FakeCaller, _job, _weights


def _options(local_norm: bool = True, server_momentum: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(asym_scope="all", server_momentum=server_momentum, local_norm=local_norm)


def _model(w: float, n: float) -> dict[str, np.ndarray]:
    return {"w": np.full(2, w, np.float32), "norm.weight": np.full(2, n, np.float32)}


def test_fedbn_averages_all_but_the_normalization_and_a_left_out_site_keeps_its_own() -> None:
    specs = {s: ModelSpec.of(_model(0, 0)) for s in ("a", "b", "c")}
    strategy = aggregation_strategy(False, _options(), specs, ["norm.weight"])
    assert type(strategy) is FedBN and strategy.model_key("b") == "b"
    models = strategy.initial_models({s: _model(i, i) for i, s in enumerate(specs, start=1)}, list(specs))
    assert sorted(models) == ["a", "b", "c", GLOBAL]
    for s in specs:  # every site starts from the first site's weights (FedAvg's start), normalization included
        np.testing.assert_array_equal(models[s]["norm.weight"], 1.0)
        assert models[s]["w"] is models[GLOBAL]["w"]  # shared, not copied per site
    assert models["a"]["norm.weight"] is not models["b"]["norm.weight"]

    strategy.start_round()
    strategy.add("a", _model(2, 10), 1.0)
    strategy.add("b", _model(4, 20), 3.0)  # c is left out of this round
    assert strategy.apply(models) == {}
    np.testing.assert_array_equal(models[GLOBAL]["w"], 3.5)
    np.testing.assert_array_equal(models[GLOBAL]["norm.weight"], 17.5)  # the plain FedAvg of everything
    for site, norm in (("a", 10.0), ("b", 20.0), ("c", 1.0)):
        np.testing.assert_array_equal(models[site]["w"], 3.5)
        np.testing.assert_array_equal(models[site]["norm.weight"], norm)
        assert list(models[site]) == ["w", "norm.weight"]  # the network's order

    # the state holds the global model and each site's normalization; restored, the site models are rebuilt
    saved = strategy.saved_models(models)
    assert {k: sorted(v) for k, v in saved.items()} == {GLOBAL: ["norm.weight", "w"], "a": ["norm.weight"],
                                                        "b": ["norm.weight"], "c": ["norm.weight"]}
    loaded = {k: {n: a.copy() for n, a in v.items()} for k, v in saved.items()}
    aggregation_strategy(False, _options(), specs, ["norm.weight"]).restore(loaded)
    for site in specs:
        assert {n: a.tolist() for n, a in loaded[site].items()} == {n: a.tolist() for n, a in models[site].items()}
    with pytest.raises(ValueError, match="from a run with --local-norm"):  # plain FedAvg refuses a FedBN state
        aggregation_strategy(False, _options(local_norm=False), specs).restore(dict(saved))
    with pytest.raises(ValueError, match=r"no normalization weights of site\(s\) a, b, c"):
        aggregation_strategy(False, _options(), specs, ["norm.weight"]).restore({GLOBAL: dict(saved[GLOBAL])})


def test_fedbn_keeps_the_normalizations_momentum_and_refuses_what_it_cannot_do() -> None:
    model = {**_model(0, 0), MOMENTUM_PREFIX + "w": np.zeros(2, np.float32),
             MOMENTUM_PREFIX + "norm.weight": np.zeros(2, np.float32)}
    specs = {s: ModelSpec.of(model) for s in ("a", "b")}
    strategy = aggregation_strategy(False, _options(), specs, ["norm.weight"])
    assert sorted(strategy.saved_models(strategy.initial_models({"a": model, "b": model}, ["a", "b"]))["a"]) == \
        sorted(["norm.weight", MOMENTUM_PREFIX + "norm.weight"])
    with pytest.raises(ValueError, match="no normalization layer"):
        aggregation_strategy(False, _options(), specs, [])
    with pytest.raises(ValueError, match="their network does not have: bn.bias"):
        aggregation_strategy(False, _options(), specs, ["bn.bias"])
    with pytest.raises(ValueError, match="--local-norm applies to FFE"):
        aggregation_strategy(True, _options(), specs, ["norm.weight"])
    with pytest.raises(ValueError, match="--local-norm and --server-momentum"):
        aggregation_strategy(False, _options(server_momentum=0.5), specs, ["norm.weight"])
    assert TrainOptions.from_dict({"rounds": 1, "local_norm": True}).local_norm


class _NormSites(_FakeCaller):
    """Fake sites (an 'epoch' adds the site's number to every weight) whose network has a normalization layer."""

    def __init__(self, fail: dict, normalization: dict[str, list[str]] | None = None) -> None:
        super().__init__({"1": {"w": (2,), "norm.weight": (2,)}, "3": {"w": (2,), "norm.weight": (2,)}}, fail)
        self.normalization = normalization or {"1": ["norm.weight"], "3": ["norm.weight"]}
        self.finished: dict[str, dict[str, np.ndarray]] = {}

    def _replies(self, op, configs, arrays):
        replies, errors = super()._replies(op, configs, arrays)
        if op == "train_init":
            for site, (info, _) in replies.items():
                info["normalization"] = self.normalization[site]
        if op == "train_finish":
            self.finished = {s: {k: v.copy() for k, v in a.items()} for s, a in arrays.items()}
        return replies, errors


def test_fold_loop_with_local_norm_left_out_site_resume_and_the_global_model(tmp_path: Path) -> None:
    from fednnunet.federation.events import EventLog
    from fednnunet.training.task import run_training_task

    events = EventLog(tmp_path / "events.jsonl")
    caller = _NormSites({("3", 2): SiteError("no reply within 5 s", ErrorKind.TIMEOUT)})
    run_training_task(_job(tmp_path, False, min_sites=1, local_norm=True), caller, events)
    got = {r: {s: {k: float(v[0]) for k, v in m.items()} for s, m in sites.items()}
           for r, sites in caller.received.items()}
    # round 1 from site 1's weights; updates (w, n) = (2, 2) with weight 1 and (4, 4) with weight 3: w -> 3.5
    assert got[1] == {"1": {"w": 1.0, "norm.weight": 1.0}, "3": {"w": 1.0, "norm.weight": 1.0}}
    assert got[2] == {"1": {"w": 3.5, "norm.weight": 2.0}, "3": {"w": 3.5, "norm.weight": 4.0}}
    # round 2: site 3 left out keeps its normalization, and gets the global weights of site 1's update
    assert got[3] == {"1": {"w": 4.5, "norm.weight": 3.0}, "3": {"w": 4.5, "norm.weight": 4.0}}
    assert "FedBN (normalization layers kept at the sites)" in (tmp_path / "events.jsonl").read_text()

    # the resumed run continues with every site's own normalization from the saved state
    caller2 = _NormSites({})
    run_training_task(_job(tmp_path, False, rounds=4, resume=True, local_norm=True), caller2, events)
    # round 3: (5.5, 4) w 1, (7.5, 7) w 3 -> global w 7.0, normalization (4 + 21) / 4 = 6.25
    assert {s: {k: float(v[0]) for k, v in m.items()} for s, m in caller2.received[4].items()} == \
        {"1": {"w": 7.0, "norm.weight": 4.0}, "3": {"w": 7.0, "norm.weight": 7.0}}
    # round 4: (8, 5) w 1, (10, 10) w 3: each site is sent the global weights with its own normalization; the
    # global model (for a hospital outside the federation) has the averaged normalization
    assert {s: {k: float(v[0]) for k, v in m.items()} for s, m in caller2.finished.items()} == \
        {"1": {"w": 9.5, "norm.weight": 5.0}, "3": {"w": 9.5, "norm.weight": 10.0}}
    exported = _weights(tmp_path / "global" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth")
    assert {k: float(v[0]) for k, v in exported.items()} == {"w": 9.5, "norm.weight": 8.75}
    saved = load_models(tmp_path, load_state(tmp_path))
    assert {k: sorted(v) for k, v in saved.items()} == {GLOBAL: ["norm.weight", "w"], "1": ["norm.weight"],
                                                        "3": ["norm.weight"]}

    with pytest.raises(ValueError, match="from a run with --local-norm"):  # resumed without the option: refused
        run_training_task(_job(tmp_path, False, rounds=5, resume=True), _NormSites({}), events)


def test_sites_must_name_the_same_normalization_layers(tmp_path: Path) -> None:
    from fednnunet.federation.events import EventLog
    from fednnunet.training.site_checks import SiteReplyError
    from fednnunet.training.task import run_training_task

    caller = _NormSites({}, normalization={"1": ["norm.weight"], "3": []})
    with pytest.raises(SiteReplyError, match="3.*normalization.*differs from site 1"):
        run_training_task(_job(tmp_path, False, local_norm=True), caller, EventLog(tmp_path / "events.jsonl"))
