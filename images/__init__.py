"""Container images: references, pulls from OCI/Docker v2 registries, a content-addressed store,
layer unpacking and per-container root filesystems.

    from images.reference import parse_reference            # InvalidReferenceError -> InvalidImageName
    from images.service import ImageService, PullError      # PullError / ImageNotFoundError -> ErrImagePull

    service = ImageService(state_dir / "images", mirrors={"registry.k8s.io": ["http://127.0.0.1:5000"]})
    ref = parse_reference("busybox:1.36")                   # docker.io/library/busybox:1.36
    image = service.present(ref) or await service.pull(ref, credentials_from_dockerconfigjson(secret_config))
    root = await service.prepare_rootfs(image, container_dir)   # container_dir/rootfs, writable
    ...                                                          # image.config: Entrypoint, Cmd, Env, User ...
    await service.release_rootfs(container_dir)
    await service.garbage_collect(in_use={image.image_id})

Layout under the root: blobs/sha256/<hex> (manifests, configs, layers, shared), images.json (the
index: names, tags, last use), unpacked/<chain id hex> (read-only bases), ingest/ and tmp/ (scratch).
Tests, the demo and benchmarks make images with images.build and serve them with images.local_registry.
"""
