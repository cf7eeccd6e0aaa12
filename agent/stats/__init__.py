"""Node and Pod usage for the kubelet API: /stats/summary and /metrics/resource."""
