"""The scheduler (``dfz sched``): hosts, tasks and peers in memory, the scheduling DAG per task, the
evaluator that picks parents, and parent assignments pushed to peers over the fabric."""
