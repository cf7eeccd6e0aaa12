"""The emulated backend: nothing runs; a container's lifecycle is played from the Pod spec.

The smallest complete Backend (backend.py): the example to start from for a new one.
"""

from runtimes.emulated.backend import EmulatedBackend

__all__ = ["EmulatedBackend"]
