"""What the benchmark scripts share."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"


def publish(table: str, name: str) -> None:
    """Print a result table and record it in benchmarks/results/<name> (the README quotes it)."""
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / name).write_text(table, encoding="utf-8")
