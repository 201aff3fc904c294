"""The persistent per-site trainer: one stock nnU-Net trainer, built once, driven one epoch per round.

Why a package of its own: a federation round must not rebuild nnU-Net's network, optimizer (SGD momentum),
data loaders or compiled graph, so the trainer lives in a long-running site process and the federation only
swaps weights in and out. ``weights`` moves weights as de-duplicated named numpy arrays (nnU-Net's
``state_dict()`` lists most tensors several times under alias keys); ``trainer`` drives the stock hooks.
"""
