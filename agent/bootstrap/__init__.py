"""Joining a cluster as the kubelet does: discovery with a bootstrap token (join.py), TLS bootstrap
through a CertificateSigningRequest (csr_client.py, client.py) and client certificate rotation
(rotation.py).

The agent's resident process never imports `cryptography`: keys and CSRs are made in a short-lived
child (keygen.py), and certificates are read with the small DER reader in certinfo.py.
"""
