"""Everything that touches Faust or aiokafka beyond their public API: app wiring, the table, the query views
and the patches, pinned to the versions they were written for.
"""
