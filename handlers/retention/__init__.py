"""Retention, the ``retention`` task of the ``maintenance`` topic (CONTRACT.md,
Retention and archives).

``tables``: each table's window, order and archive line; ``archive``: objects and
their manifests (write, read back, check); ``chunks``: the record of archived objects
and the sweep of what interrupted runs left; ``sweep``: one table's rows past its
window, chunk by chunk; ``partitions``: whole metrics months, exported then dropped;
``task``: the run; ``restore``: archived rows back into a database.
"""
