"""What the benchmark scripts share."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"


def publish(table: str, name: str) -> None:
    """Print a result table and record it in benchmarks/results/<name> (the README quotes it)."""
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / name).write_text(table, encoding="utf-8")


def build_bmodel(variables: dict[str, str]) -> tuple[Path, str]:
    """`doit combine` with these build variables, as a user runs it; the bmodel and doit's output."""
    from pipeline.build_config import parse_build_config

    doit = Path(sys.executable).parent / "doit"
    out = subprocess.run([str(doit), "combine", *(f"{k}={v}" for k, v in variables.items())], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    built = parse_build_config(variables)
    return built.dist_dir / f"{built.dist_name}.bmodel", out.stdout + out.stderr
