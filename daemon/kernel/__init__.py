"""Kernel layer: syscalls on fds and mappings, nothing else (see ops.py)."""
