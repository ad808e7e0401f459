"""memplug's benchmark: `python -m memplug.daemon.bench` (or `make bench`).

Measures, in one run on one machine, memplugd end to end (a real daemon
subprocess on its own sockets) beside the raw kernel paths in a plain process
and QEMU's own preallocation, and writes docs/bench.md with the issue's
targets marked PASS or FAIL.

Layout: stats (the one place that summarizes samples), report (sections,
rows, targets, markdown and JSON), machine (header facts, hugetlb pool,
tmpfs), raw (kernel paths in this process), qemu, memplugd (the daemon
subprocess), sections (one function per section), cli.
"""
