"""memplug's measuring tools, kept out of the wheel and the image.

The benchmark: `python -m bench` (or `make bench`), run from the repository
root. Measures, in one run on one machine, memplugd end to end (a real daemon
subprocess on its own sockets) beside the raw kernel paths in a plain process
and QEMU's own preallocation, and writes docs/bench.md with memplug's
performance targets marked PASS or FAIL.

Layout: stats (the one place that summarizes samples), report (sections,
rows, targets, markdown and JSON), machine (header facts, hugetlb pool,
tmpfs), raw (kernel paths in this process), qemu, memplugd (the daemon
subprocess), sections (one function per section), cli.

The reliability runner: `python -m bench.reliability` (or `make reliability`)
runs the hardening tests and renders docs/reliability.md from the figures
they record.
"""
