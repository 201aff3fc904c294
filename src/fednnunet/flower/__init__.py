"""Thin Flower layer: the ServerApp runs a federation job, the site worker answers the ClientApp's messages in
its own process, and the caller carries the protocol's messages over a Flower Grid."""
