"""Exceptions shared across the sandbox's trusted side."""

from __future__ import annotations


class SandboxFailure(Exception):
    """The harness itself failed (a worker or zygote died or misbehaved); never a verdict on the program."""


class ProtocolError(Exception):
    """A job sent bytes that are not a well-formed, plain-data message."""
