"""Errors of image pulls. The agent maps PullError to ErrImagePull."""

from __future__ import annotations


class PullError(Exception):
    """A pull failed; the message names the image and the cause (unauthorized, network, digest mismatch)."""


class ImageNotFoundError(PullError):
    """The registry has no such repository, tag or digest."""


class UnauthorizedError(PullError):
    """The registry refused the credentials (or wants some and none matched)."""
