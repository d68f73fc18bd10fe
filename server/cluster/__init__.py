"""``camserve cluster``: several ``camserve serve`` replicas behind one Envoy, supervised.

    options.py     ClusterConfig (the cluster's own options + a ServerConfig template for
                   the replicas), the checks made before anything starts, the replicas' ports
    children.py    the supervised subprocesses: Child, Replica, EnvoyProcess, restart backoff
    probes.py      grpc.health.v1 checks and Envoy's admin interface
    supervisor.py  start_cluster -> RunningCluster (supervision, stop)
    envoy.py       Envoy's bootstrap configuration, a pure function
                   (``python -m camserve.server.cluster.envoy HOST:PORT...`` prints it)
    cli.py         the ``camserve cluster`` command

Import from the modules (``from camserve.server.cluster.supervisor import start_cluster``):
this package imports none of them, so ``python -m camserve.server.cluster.envoy`` loads
only the renderer.
"""
