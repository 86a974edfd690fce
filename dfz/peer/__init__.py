"""The peer daemon (``dfz daemon``, ``dfz seed``): piece storage, the piece server, the downloader,
back-to-source backends, the local API, and the registry mirror and HTTP proxy."""
