"""The web console, ``pdoflowd web``: a process of its own.

A small read-mostly console over the database (never over the daemons):
the overview, postings, a posting's and a job's pages, and (with
``[web] allow_actions``) pause, resume, cancel and retry. Its parts:

- :mod:`~pdoflowd.web.serve`: the process (config, database check, TLS,
  uvicorn) and ``--add-user``;
- :mod:`~pdoflowd.web.app`: routes, forms, live events, static files;
- :mod:`~pdoflowd.web.pages`: login, the pages and their reads;
- :mod:`~pdoflowd.web.actions`: confirmed actions and their audit line;
- :mod:`~pdoflowd.web.auth`: the users file, password hashes, CSRF tokens;
- :mod:`~pdoflowd.web.inputs`: input checks and the pages' arithmetic.

Only :mod:`pdoflowd.daemon.command` imports it, and only for ``pdoflowd
web``: the daemon never loads the web stack.
"""
