"""Benchmarks for Hedgerow: what the gateway adds on top of its upstream, measured against a bare proxy.

Everything runs on loopback in separate processes (fake upstream, proxies, load generator), so one can be
pinned away from another and no component's event loop slows a different one down.
Entry point: `python -m benchmarks [scenario]`; see benchmarks/README.md.
"""
