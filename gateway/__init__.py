"""The webhook gateway: verifies RongCloud's signed callbacks and publishes every event to Kafka."""
