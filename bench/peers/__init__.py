"""Two peer queues, PgQueuer and procrastinate, drained as pdoflowd is.

The benchmark's ``--peers`` mode (:mod:`bench.peersrun`) uses this
package. :mod:`bench.peers.install` makes and reuses the peers' own virtual
environment; :mod:`bench.peers.drain` times one peer's drain of pre-loaded
no-op jobs on a fresh database. The other files here are the driver scripts
that run under the peers' environment as subprocesses (one enqueue helper
and one worker per peer); they import nothing from pdoflowd or ``bench``,
and nothing imports them.
"""
