"""``dfz top``: a live terminal view of a cluster, from its schedulers' ``sched.inspect`` snapshots and its
manager's REST API. ``view.py`` computes what to show (no I/O), ``render.py`` draws it with rich, ``app.py``
finds the sources, polls them, reads keys and runs the screen."""
