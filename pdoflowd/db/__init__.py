"""The database layer: every SQL statement of pdoflowd, and its schema.

Split by use: :mod:`~pdoflowd.db.queue` is the hot path of the queue (claim,
outcomes, giving back, settling), :mod:`~pdoflowd.db.upkeep` the daemons'
own rows and sweeps, :mod:`~pdoflowd.db.postings` the submitters' writes,
reads and controls, :mod:`~pdoflowd.db.onejob` one named job (``execute-job``
and a job's progress), :mod:`~pdoflowd.db.dependencies` postings that
wait for postings, :mod:`~pdoflowd.db.shared` and
:mod:`~pdoflowd.db.profiles` the shared variables and profiles,
:mod:`~pdoflowd.db.migrate` the versioned schema (``schema.sql`` and
``migrations/``). It imports only the shared vocabulary (statuses) and
psycopg.
"""
