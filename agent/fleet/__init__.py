"""`kubelet-emu fleet`: many emulated nodes from one process, sharing its watches and connections."""
