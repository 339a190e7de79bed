"""The capture drop counter's name and help text (standard library only: the supervisor imports it).

Two processes write the counter: the workers count their own drops through ``prometheus_client``
(``serving/metrics.py``), and the supervisor adds the requests a dead worker held by writing the
multiprocess file itself (``capture_loss.py``). Both read the name and help from here, so /metrics
shows one family with one help text whichever file it reads first.
"""

DROPPED_METRIC = "mlflow_deploy_capture_dropped_requests"
DROPPED_HELP = ("Requests not captured (buffer full, write error, or answered by a worker that died "
                "before spooling them).")
