"""pdoflowd's throughput and latency benchmark (``python -m bench``).

Measures enqueue, drain, pickup latency, drain with a long history and the
daemon's footprint on a throwaway PostgreSQL (or a server given by
``--dsn``), next to PostgreSQL's own limit for the same queue shape measured
with pgbench in the same run. Nothing in pdoflowd imports this package.
"""
