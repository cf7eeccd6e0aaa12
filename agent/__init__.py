"""kubelet-emu: the API-server side of the node agent (node, pods, status, events, CLI)."""

__version__ = "0.1.0"
