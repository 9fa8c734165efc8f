"""A worker's output capture, in a process of its own (it takes over the
process's stdout and stderr): each job gets exactly what it wrote, however
the reader thread and the job's ends interleave."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

_CHILD = textwrap.dedent(
    """
    import os, random, sys, uuid
    from pdoflowd.daemon.capture import OutputCapture

    results = os.fdopen(os.dup(1), "w")
    journal = open(sys.argv[1], "wb", buffering=0)
    capture = OutputCapture(int(sys.argv[2]), journal)
    rng = random.Random(int(sys.argv[3]))
    wrong = 0
    for n in range(int(sys.argv[4])):
        job = uuid.uuid4()
        capture.begin(job)
        kind = rng.randrange(5)
        if kind == 0:
            text = ""
        elif kind == 1:
            text = f"line {n}\\n"
        elif kind == 2:
            text = f"no end {n}"
        elif kind == 3:
            text = "".join(f"{n}:{i}\\n" for i in range(rng.randrange(50)))
        else:
            text = "x" * rng.randrange(1, 200_000)
        if text:
            (sys.stdout if n % 2 else sys.stderr).write(text)
        got = capture.end()
        data = b"" if got is None else got.tail
        want = text.encode()[-capture.tail_bytes:]
        if data != want or (got is not None and got.total_bytes != len(text)):
            wrong += 1
            print(n, kind, len(data), len(want), file=results)
    print("wrong", wrong, file=results)
    results.flush()
    """
)


def test_each_job_gets_exactly_what_it_wrote(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(journal), "65536", "7", "3000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "wrong 0", done.stdout
    # Lines reached the journal prefixed with their job's id.
    lines = journal.read_bytes().splitlines()
    assert lines
    assert all(line.startswith(b"[job ") for line in lines), lines[:3]
