"""Shared parts of the presence pipeline: settings, topics, the local Kafka broker and the CLI."""
