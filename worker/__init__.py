"""utxoIQ persistence worker: the runtime (config, database, sources, CLI)."""
