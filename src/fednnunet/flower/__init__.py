"""Thin Flower layer: the ServerApp runs a federation job, the ClientApp relays to the site worker."""
