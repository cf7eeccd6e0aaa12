"""Container images: references, pulls from OCI/Docker v2 registries, a content-addressed store,
layer unpacking and per-container root filesystems."""
