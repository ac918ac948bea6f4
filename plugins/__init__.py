"""Built-in frontends and backends, one per folder; each registers through the `qcompiler` entry-point group."""
