"""The foundation every component builds on: settings, topics, logs, Kafka clients and the upstream contract.

Imports nothing from the services (`gateway`, `streams`) or the tooling (`presence`).
"""
