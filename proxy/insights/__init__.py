"""What the gateway tells its operators: Prometheus metrics (metrics.py) and the access log (access.py), both
fed from finished generations in batches, off the request path (see `Accountant.observers`)."""
