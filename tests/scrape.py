"""Reading a Prometheus scrape in tests, and checking it with promtool."""

from __future__ import annotations

import subprocess

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Scrape = dict[tuple[str, Labels], float]


# ------------------------------------------------------------ helpers


def parse_scrape(text: str) -> Scrape:
    """A scrape as {(sample name, sorted label pairs): value}."""
    samples: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples[(sample.name, labels)] = sample.value
    return samples


def scrape_value(scrape: Scrape, name: str, **labels: str) -> float:
    """One sample's value; KeyError names what is missing."""
    key = (name, tuple(sorted(labels.items())))
    if key not in scrape:
        raise KeyError(f"no sample {name}{labels} in the scrape")
    return scrape[key]


def scrape_sum(scrape: Scrape, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        value
        for (sample, pairs), value in scrape.items()
        if sample == name and wanted <= set(pairs)
    )


def promtool_check_metrics(promtool: str, text: bytes) -> None:
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        timeout=60,
    )
    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, problems
    assert not problems.strip(), problems
