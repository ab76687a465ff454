"""Repo-only real protocol peers (Kamailio, SIPp, nginx, redis-server, node) that integration
tests and benchmarks start on 127.0.0.1 (the shared process handling: ``_process``). They
hard-code Debian paths and configuration files: they do not ship.
"""
