"""The kubelet HTTPS API (port 10250): what `kubectl logs/exec/port-forward/top` reach through the API server."""
