"""The manager (``dfz mgr``): clusters, keepalive, dynamic configuration, preheat jobs, users, roles,
tokens and tenants, the REST and open API, and the web console."""
