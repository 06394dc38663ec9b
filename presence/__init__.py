"""The command line and developer tooling: `presence` commands, the local broker, the demo, simulator and
inspection tools. Sits on top of `core`, `gateway` and `streams`; nothing below imports it.
"""
