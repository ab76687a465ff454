"""Repo-only real protocol peers (Kamailio, SIPp, nginx) that integration tests and benchmarks
start on 127.0.0.1. They hard-code Debian paths and configuration files: they do not ship.
"""
