"""How SGD momentum meets averaging (aggregation/momentum.py, training/weights.py): the pure pieces, and the server loop
with FedAvgM through a resume (fake sites, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fednnunet.aggregation.momentum import MOMENTUM_PREFIX, ServerMomentum, split_momentum
from fednnunet.training.weights import copy_in_place, momentum_buffers, unique_state


def test_split_momentum_takes_the_prefixed_buffers_apart() -> None:
    a, b = np.zeros(2), np.ones(3)
    weights, momentum = split_momentum({"w": a, MOMENTUM_PREFIX + "w": b})
    assert list(weights) == ["w"] and weights["w"] is a
    assert list(momentum) == ["w"] and momentum["w"] is b
    assert split_momentum({"w": a}) == ({"w": a}, {})


def test_server_momentum_is_fedavgm_and_plain_fedavg_at_zero() -> None:
    beta = 0.5
    server = ServerMomentum(beta)
    g = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}
    # round 1: velocity 0 -> v = g - avg, g = avg (plain FedAvg)
    server.step(g, {"w": np.array([0.0, 4.0], np.float32), "n": np.array(5, np.int64)})
    np.testing.assert_array_equal(g["w"], [0.0, 4.0])
    assert int(g["n"]) == 5 and "n" not in server.velocity
    # round 2: v = 0.5 * [1, -2] + ([0, 4] - [1, 3]) = [-0.5, 0]; g = [0, 4] - v = [0.5, 4]
    server.step(g, {"w": np.array([1.0, 3.0], np.float32), "n": np.array(5, np.int64)})
    np.testing.assert_allclose(server.velocity["w"], [-0.5, 0.0])
    np.testing.assert_allclose(g["w"], [0.5, 4.0])
    assert g["w"].dtype == np.float32

    plain = ServerMomentum(0.0)
    g = {"w": np.array([1.0, 2.0], np.float32)}
    for avg in ([0.0, 4.0], [7.0, -1.0]):
        plain.step(g, {"w": np.array(avg, np.float32)})
        np.testing.assert_array_equal(g["w"], avg)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="server momentum must be in"):
            ServerMomentum(bad)


def test_a_zero_momentum_buffer_steps_exactly_like_none() -> None:
    """What lets --momentum average send zeros before a site's first step: nnU-Net's SGD (momentum 0.99, Nesterov,
    dampening 0) takes the same steps, bit for bit, from zero buffers as from none."""
    runs = []
    for make_zero in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.InstanceNorm2d(4, affine=True),
                                  torch.nn.Conv2d(4, 2, 1))
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
        if make_zero:
            buffers = momentum_buffers(net, opt)
            assert list(buffers) == list(unique_state(net)) and all(not b.any() for b in buffers.values())
        for step in range(3):
            torch.manual_seed(100 + step)
            opt.zero_grad()
            net(torch.randn(2, 1, 8, 8)).square().mean().backward()
            opt.step()
        runs.append(unique_state(net))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_momentum_buffers_are_the_optimizers_own() -> None:
    net = torch.nn.Linear(3, 2)
    net.register_buffer("count", torch.zeros((), dtype=torch.long))
    opt = torch.optim.SGD([net.weight], lr=0.1, momentum=0.9)  # the bias is not trained here
    buffers = momentum_buffers(net, opt)
    assert list(buffers) == ["weight"]
    buffers["weight"].fill_(2.0)
    assert torch.equal(opt.state[net.weight]["momentum_buffer"], torch.full((2, 3), 2.0))
    assert momentum_buffers(net, opt)["weight"] is buffers["weight"]
    # what SiteTrainer.set_momentum writes with: all or nothing
    with pytest.raises(ValueError, match=r"shape mismatch for 'weight': got \(3, 2\), optimizer has \(2, 3\)"):
        copy_in_place(buffers, {"weight": np.zeros((3, 2), np.float32)}, what="momentum buffer", holder="optimizer")
    with pytest.raises(ValueError, match="unexpected momentum buffer 'bias'"):
        copy_in_place(buffers, {"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32)},
                      what="momentum buffer", holder="optimizer")
    assert torch.equal(buffers["weight"], torch.full((2, 3), 2.0))
    copy_in_place(buffers, {"weight": np.ones((2, 3), np.float64)}, what="momentum buffer", holder="optimizer")
    assert torch.equal(opt.state[net.weight]["momentum_buffer"], torch.ones(2, 3))


def test_server_loop_with_server_momentum_resumes_its_velocity(tmp_path: Path) -> None:
    """Fake sites (each 'epoch' adds the site's number): FedAvgM's global model round by round, and a run stopped
    after round 2 and resumed ends where the uninterrupted run ends (the velocity is in the saved state)."""
    from test_training import _FakeCaller, _job

    from fednnunet.federation.events import EventLog
    from fednnunet.training.state import load_models, load_state
    from fednnunet.training.task import run_training_task

    shapes = {"1": {"w": (2,)}, "3": {"w": (2,)}}
    beta = 0.5
    whole = tmp_path / "whole"
    caller = _FakeCaller(shapes, {})
    run_training_task(_job(whole, False, rounds=3, server_momentum=beta), caller, EventLog(whole / "events.jsonl"))
    # sites add 1 and 3, weighted 1 : 3 -> the average is g + 2.5 every round; v_r = beta v + (g - avg) = -2.5 - ...
    g, v, expected = 1.0, 0.0, []
    for _ in range(3):
        expected.append(g)
        v = beta * v - 2.5
        g = g - v
    assert [float(caller.received[r]["1"]["w"][0]) for r in (1, 2, 3)] == pytest.approx(expected)
    final = load_models(whole, load_state(whole))["global"]["w"]
    np.testing.assert_allclose(final, g)

    split = tmp_path / "split"
    run_training_task(_job(split, False, rounds=2, server_momentum=beta), _FakeCaller(shapes, {}),
                      EventLog(split / "events.jsonl"))
    resumed = _FakeCaller(shapes, {})
    run_training_task(_job(split, False, rounds=3, server_momentum=beta, resume=True), resumed,
                      EventLog(split / "events.jsonl"))
    assert list(resumed.received) == [3]
    np.testing.assert_array_equal(load_models(split, load_state(split))["global"]["w"], final)


def test_momentum_options_are_checked() -> None:
    from fednnunet.training.options import TrainOptions

    assert TrainOptions(momentum="average").train_init("0", False).momentum == "average"
    assert not hasattr(TrainOptions(server_momentum=0.5).train_init("0", False), "server_momentum")
    with pytest.raises(ValueError, match="momentum must be one of local, reset, average"):
        TrainOptions(momentum="nesterov")
    with pytest.raises(ValueError, match=r"server_momentum must be in \[0, 1\)"):
        TrainOptions(server_momentum=1.5)
    with pytest.raises(ValueError, match="choose one"):
        TrainOptions(momentum="average", server_momentum=0.5)
