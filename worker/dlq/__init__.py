"""Dead-letter operations for operators: ``operations.DeadLetters`` (what ``utxoiq-worker
dlq`` wraps), the dead letters themselves (``letters``), how a command holds them while
it works (``leases``), and the export file a replay can read back (``replay_file``)."""
