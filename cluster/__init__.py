"""Cluster definitions and local multi-node helpers (see cluster/README.md)."""
