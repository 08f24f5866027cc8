"""Standalone scripts that the tests launch in subprocesses (e.g. multi-process DDP runs)."""
