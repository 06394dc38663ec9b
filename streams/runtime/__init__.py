"""Everything that touches Faust or aiokafka beyond their public API, pinned to the versions it was written for.

``app`` wires the pieces into one ``faust.App``; ``delivery`` hands RAW, ticks and the changelog to the agent and
to recovery one fetched partition batch at a time; ``table`` is the users table over Faust's RocksDB store and its
changelog; ``fixes`` makes offset commits wait for Kafka's acknowledgements; ``views`` is the query API;
``progress`` measures readiness and lag; ``worker`` runs the app in the foreground; ``internals`` holds every
private Faust/aiokafka name used, and ``versions`` refuses any other version of them.
"""
