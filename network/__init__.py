"""Pod networking: a network namespace, a veth on a node bridge and an address per Pod.

- network.ipam: addresses from the pod CIDR, persisted per owner (Pod UID).
- network.netns: creating, entering and removing named network namespaces; TCP connections and
  subprocesses inside one (port-forward, the process backend).
- network.iptables: the bridge's FORWARD rules and the optional MASQUERADE rule.
- network.pods: PodNetworks, the bridge and per-Pod setup/teardown/orphan cleanup.
- network.helper, network.helper_client: PodNetworks in a child process of the agent, so that
  netlink work runs on another core and never blocks the agent's event loop.
- network.fresh_pod: a new Pod's namespace, veth and address in one thread with hand-built
  rtnetlink requests (the hot path of a mass start; pyroute2 does the rest).
- network.link_delete: deleting an interface from a worker thread (the kernel waits for RCU).
- network.podnet: PodNet and PodNetworkError, without the netlink imports.
"""
