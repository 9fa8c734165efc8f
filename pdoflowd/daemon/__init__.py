"""The daemon side: the ``pdoflowd`` command and the processes it runs.

:mod:`~pdoflowd.daemon.command` parses the command line;
:mod:`~pdoflowd.daemon.supervisor` is the main loop, the only part that
speaks to systemd; the database session, the worker pool and the workers
live beside it. Nothing outside this package imports it, except ``pdoflow
execute-job`` (:mod:`~pdoflowd.daemon.foreground`).
"""
