"""Built-in passes, one per file; each registers through the `qcompiler` entry-point group."""
