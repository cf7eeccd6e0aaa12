"""Small helpers every layer may use (agent, runtimes, cgroups, images, network). Imports nothing
from those packages."""
