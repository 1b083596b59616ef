"""Supervisor: owns netlink, keyrings and key material; runs the worker pool."""
