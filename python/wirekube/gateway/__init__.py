"""The WireKube gateway controller (``wirekube-gateway``).

Layers:
- pure: ``contract`` (the status fields and duties shared with the agents; start there),
  ``health`` (is a gateway peer healthy), ``election`` (active peer, make-before-break handover),
  ``clients`` (who routes through a gateway), ``cidrs`` (route overlap checks), ``podcidr`` (pod
  CIDR sync plan), ``relay`` (relay endpoint discovery from the Service), ``conditions`` and
  ``plan`` (one gateway's status, patch and Events), ``awsroutes`` (``spec.awsVPCRoutes``: the
  field, where VPC routes must point, the idempotent route plan);
- I/O: ``controller`` (informers, Lease, reconcile loop, writes through :mod:`wirekube.k8s`),
  ``awsfollower`` (the thread that applies ``awsroutes`` through botocore), ``metrics``
  (Prometheus and probes) and ``main`` (the CLI).
"""
