"""Prometheus rules and the Grafana dashboard that plot adapter-server metrics (shipped as package data)."""
