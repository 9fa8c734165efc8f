"""Scripts that measured the concurrency caps (docs/performance.md)."""
