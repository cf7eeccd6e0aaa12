"""The dev control plane: a Go program (this folder) plus the Python code that builds and runs it."""
