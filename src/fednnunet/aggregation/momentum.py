"""How SGD momentum meets averaging (issue 17): the sites' momentum buffers on the wire, and server momentum.

nnU-Net trains with SGD, momentum 0.99 (Nesterov). A federation has three choices for the sites' buffers, set by
``--momentum`` and carried out at the site (``training/session.py``):

* ``local`` (default): every site keeps its own buffer from round to round, as its optimizer left it;
* ``reset``: every site zeroes its buffer when it loads the round's model (each round starts like a fresh SGD);
* ``average``: the buffers travel with the weights, under the names :data:`MOMENTUM_PREFIX` + parameter name, and
  are averaged like them (with the same weights), so every site continues from the same model *and* the same
  momentum. It doubles the bytes of every round, both ways.

Server momentum (FedAvgM, Hsu et al. 2019; ``--server-momentum BETA``, FFE only) is the server's own: it treats
the change the round's average makes to the global model as a pseudo-gradient and applies it with momentum,
``v <- BETA v + (g - avg)``, ``g <- g - v`` (server learning rate 1; BETA = 0 is plain FedAvg).

Pure numpy, no torch: tested without a network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import get_args

import numpy as np

from fednnunet.protocol.messages import MomentumMode

__all__ = ["MOMENTUM_MODES", "MOMENTUM_PREFIX", "ServerMomentum", "split_momentum"]

MOMENTUM_MODES: tuple[str, ...] = get_args(MomentumMode)
#: Name prefix of a parameter's SGD momentum buffer when it travels beside the weights (``--momentum average``).
MOMENTUM_PREFIX = "sgd_momentum/"

Arrays = dict[str, np.ndarray]


def split_momentum(arrays: Mapping[str, np.ndarray]) -> tuple[Arrays, Arrays]:
    """``(weights, momentum)``: the network's arrays, and the momentum buffers with the prefix taken off."""
    weights: Arrays = {}
    momentum: Arrays = {}
    for name, array in arrays.items():
        if name.startswith(MOMENTUM_PREFIX):
            momentum[name[len(MOMENTUM_PREFIX):]] = array
        else:
            weights[name] = array
    return weights, momentum


class ServerMomentum:
    """FedAvgM's server step, in place on the global model; the velocity is kept from round to round.

    Only floating-point arrays get momentum; integer and boolean arrays (counters) take the average's value.
    The velocity starts at zero, so the first round is plain FedAvg.
    """

    def __init__(self, beta: float, velocity: Mapping[str, np.ndarray] | None = None) -> None:
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.velocity: Arrays = {k: np.array(v, copy=True) for k, v in (velocity or {}).items()}

    def step(self, model: Arrays, average: Mapping[str, np.ndarray]) -> None:
        """Move ``model`` (the global model the round started from) towards ``average`` with momentum."""
        for name, g in model.items():
            a = average[name]
            if g.dtype.kind != "f":
                g[...] = a
                continue
            v = self.velocity.get(name)
            if v is None or v.shape != g.shape or v.dtype != g.dtype:
                v = self.velocity[name] = np.zeros_like(g)
            v *= self.beta
            v += g
            v -= a
            g -= v
