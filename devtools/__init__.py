"""Development tools shared by ``make demo``, the tests and the benchmark.

Never shipped: not in the wheel, not in the Debian package. It holds a
throwaway local PostgreSQL cluster (trust authentication: never for
production), the demo, and the driver that starts ``pdoflowd`` with a
notify socket and waits for ``READY=1``.
"""
