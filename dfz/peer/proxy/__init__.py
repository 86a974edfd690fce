"""The daemon's proxy port (``proxy_listen``): an HTTP/1.1 server (:mod:`.server`) that serves the registry
mirror (:mod:`.mirror`), and the forward proxy and CONNECT tunnels through pluggable handlers; dfz tasks
are served as HTTP responses by :mod:`.task`."""
