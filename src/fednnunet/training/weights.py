"""Moving a live nnU-Net network's weights in and out as de-duplicated, named numpy arrays.

Why this exists: nnU-Net's ``PlainConvUNet``/``ResidualEncoderUNet`` register the same sub-modules under
several names (``decoder.encoder`` is the encoder itself, ``convs.N.all_modules`` repeats ``conv``/``norm``),
so ``state_dict()`` lists each tensor up to three times (for the default 2D network about 152 of 240 keys
are aliases). Sending ``state_dict()`` over the wire triples the payload, and averaging it key by key
averages the same tensor several times. Here each tensor appears once, under the first key that
``state_dict()`` gives it, so names stay ordinary nnU-Net checkpoint keys (``encoder.stages.0...``).

Loading writes in place into the live tensors instead of calling ``load_state_dict`` on a new dict: the
optimizer holds references to the very ``Parameter`` objects (its momentum buffers are keyed by them) and a
``torch.compile``'d graph is specialised to them, so in-place copies keep both valid across rounds.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["unwrap", "unique_tensors", "alias_map", "normalization_keys", "unique_state", "load_unique_state",
           "copy_in_place", "momentum_buffers"]

#: The normalization layers whose parameters (and running statistics) ``--local-norm`` keeps at each site: batch and
#: instance norm (``_NormBase``), group norm and layer norm, the ones nnU-Net's ``norm_op`` can name.
_NORMALIZATION_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """Returns the plain network inside DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers.

    Why: the wrappers prefix every ``state_dict`` key (``module.``, ``_orig_mod.``); nnU-Net's own checkpoints
    store the unwrapped keys, and so do we, so the names match across sites whatever wrapping each site uses.
    Wrappers can nest in either order (compile of DDP, DDP of compile), hence the loop.
    ``OptimizedModule`` is looked up in ``sys.modules`` instead of imported: importing ``torch._dynamo`` costs
    over a second, and a compiled module cannot exist unless ``torch.compile`` already imported it.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized_module = getattr(eval_frame, "OptimizedModule", None)
    module = network
    while True:
        if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            module = module.module
        elif optimized_module is not None and isinstance(module, optimized_module):
            module = module._orig_mod
        else:
            return module


def _alias_key(tensor: torch.Tensor) -> tuple:
    """Identity of the memory a tensor shows: two tensors with equal keys read and write the same values.

    Storage pointer + offset + shape + stride + dtype (+ device) is exactly "same view of the same memory".
    Object identity alone would also work for nnU-Net (its aliases are the same ``Parameter`` objects) but
    would miss tied weights that are distinct tensor objects viewing one storage. Empty tensors and tensors
    without real storage (meta) have no meaningful data pointer (all empty tensors may report 0), so they
    fall back to object identity rather than being wrongly merged.
    """
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return ("id", id(tensor))
    return (
        "storage",
        str(tensor.device),
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def unique_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors of ``unwrap(module).state_dict()``, one key per distinct tensor (first key wins).

    Why ``state_dict(keep_vars=True)`` and not ``named_parameters/named_buffers(remove_duplicate=True)``:
    the result must be exactly the set of keys nnU-Net checkpoints and ``load_pretrained_weights`` use.
    ``named_buffers`` also yields non-persistent buffers that ``state_dict`` leaves out, lists parameters
    and buffers in two separate passes (a different order than ``state_dict``), and de-duplicates by
    module/object identity only. Walking ``state_dict`` in order and dropping repeats of the same memory
    (see ``_alias_key``) keeps checkpoint names, checkpoint order and exactly one entry per tensor.
    ``keep_vars=True`` returns the live ``Parameter`` objects rather than detached copies.
    """
    seen: set[tuple] = set()
    result: dict[str, torch.Tensor] = {}
    for key, tensor in unwrap(module).state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):  # e.g. _extra_state of custom modules: not a weight
            continue
        alias = _alias_key(tensor)
        if alias in seen:
            continue
        seen.add(alias)
        result[key] = tensor
    return result


def alias_map(module: torch.nn.Module) -> dict[str, str]:
    """Every ``state_dict`` key (in order) -> the key that ``unique_state`` uses for the same tensor.

    Why: peers only exchange de-duplicated weights, but nnU-Net loads checkpoints with a strict
    ``load_state_dict`` that needs the alias keys too; with this map a full ``state_dict`` can be rebuilt as
    ``{key: arrays[canonical] for key, canonical in alias_map(net).items()}`` without holding the network.
    """
    first: dict[tuple, str] = {}
    result: dict[str, str] = {}
    for key, tensor in unwrap(module).state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            continue
        result[key] = first.setdefault(_alias_key(tensor), key)
    return result


def normalization_keys(module: torch.nn.Module) -> list[str]:
    """The keys (as :func:`unique_state` names them) of the tensors that belong to normalization layers, in
    ``state_dict`` order.

    Why from the modules and not from the names: nnU-Net's networks call their norm ``norm``, but a trainer may
    build any architecture (``network_class_name`` in the plans); the layer type is what FedBN's rule is about. Every
    alias of a tensor is looked at, so the key matches :func:`unique_state`'s whichever alias came first."""
    norm_tensors = {_alias_key(t) for m in unwrap(module).modules() if isinstance(m, _NORMALIZATION_LAYERS)
                    for t in m.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)}
    return [key for key, tensor in unique_tensors(module).items() if _alias_key(tensor) in norm_tensors]


def unique_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """De-duplicated weights of ``module`` as CPU numpy arrays (independent copies), in ``state_dict`` order.

    Copies, because on CPU ``tensor.numpy()`` shares memory with the live tensor: the next training step would
    silently change arrays that the caller may still be sending or averaging.
    """
    return {key: array.copy() for key, array in live_state(module).items()}


def live_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """As :func:`unique_state`, but on the CPU views of the live tensors (copies only of tensors on a GPU).

    For a caller that is done with them before the network changes again, e.g. a reply that is packed into its
    message at once: the model is then copied once (into the message) instead of twice.
    """
    with torch.no_grad():
        return {key: tensor.detach().cpu().numpy() for key, tensor in unique_tensors(module).items()}


def load_unique_state(module: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes ``arrays`` (keys as from ``unique_state``) in place into the live tensors of ``module``.

    All keys and shapes are checked before anything is written, so a bad payload leaves the network untouched.
    Values are cast to each tensor's dtype (``copy_`` semantics) but only within the same kind: a float array
    for an integer buffer is refused rather than truncated.

    Raises:
        ValueError: a key is missing or unexpected, a shape differs, or a dtype cannot be cast safely;
            the message names the key.
    """
    live = unique_tensors(module)
    copy_in_place(live, arrays, hint="keys must be the de-duplicated state_dict keys of this network")
    logger.debug("loaded %d unique tensors in place", len(live))


def copy_in_place(live: Mapping[str, torch.Tensor], arrays: Mapping[str, np.ndarray], what: str = "weight",
                  holder: str = "network", hint: str | None = None) -> None:
    """Writes ``arrays`` into the ``live`` tensors of the same names (``copy_``: cast to each tensor's dtype within
    the same kind), after checking every name, shape and dtype kind, so a bad payload writes nothing.

    ``what`` / ``holder`` name the tensors and their owner in the messages (weights of the network, momentum
    buffers of the optimizer); ``hint`` follows the message about an unexpected name.

    Raises:
        ValueError: a name is missing or unexpected, a shape differs, or a dtype cannot be cast safely; the message
            names the key.
    """
    missing = [k for k in live if k not in arrays]
    unexpected = [k for k in arrays if k not in live]
    if missing:
        raise ValueError(f"missing {what} {missing[0]!r} ({len(missing)} missing in total)")
    if unexpected:
        raise ValueError(f"unexpected {what} {unexpected[0]!r} ({len(unexpected)} unexpected in total)"
                         + ("" if hint is None else f"; {hint}"))
    prepared: dict[str, np.ndarray] = {}
    for key, tensor in live.items():
        array = np.asarray(arrays[key])
        if tuple(array.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for {key!r}: got {tuple(array.shape)}, "
                             f"{holder} has {tuple(tensor.shape)}")
        target = torch.empty(0, dtype=tensor.dtype).numpy().dtype
        if not np.can_cast(array.dtype, target, casting="same_kind"):
            raise ValueError(f"dtype mismatch for {key!r}: cannot cast {array.dtype} to {target}")
        if not array.flags.writeable or not array.flags.c_contiguous:
            # torch.from_numpy warns on read-only arrays (e.g. from a network buffer) and wants contiguous data.
            # Not np.ascontiguousarray: it turns 0-d arrays (scalar buffers) into shape (1,).
            array = np.array(array, order="C", copy=True)
        prepared[key] = array
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(torch.from_numpy(prepared[key]))


def momentum_buffers(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The live SGD momentum buffer of every de-duplicated weight that ``optimizer`` trains, keyed as
    :func:`unique_state` (weights it does not train have none and are left out).

    A weight without a buffer yet (before its first step) gets one of zeros: with nnU-Net's SGD (dampening 0) the
    next step is then the same, bit for bit, as from no buffer (``buf = 0.99 * 0 + grad``).
    """
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    buffers: dict[str, torch.Tensor] = {}
    for key, tensor in unique_tensors(module).items():
        if id(tensor) not in trained:
            continue
        state = optimizer.state[tensor]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        buffers[key] = state["momentum_buffer"]
    return buffers
