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
    from pipeline.graph.build_config import parse_build_config

    doit = Path(sys.executable).parent / "doit"
    out = subprocess.run([str(doit), "combine", *(f"{k}={v}" for k, v in variables.items())], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    built = parse_build_config(variables)
    return built.dist_dir / f"{built.dist_name}.bmodel", out.stdout + out.stderr


def export_onnx(variables: dict[str, str]) -> Path:
    """`doit export` with these build variables: the folder of the ONNX pieces."""
    from pipeline.graph.build_config import parse_build_config

    doit = Path(sys.executable).parent / "doit"
    subprocess.run([str(doit), "export", *(f"{k}={v}" for k, v in variables.items())], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return parse_build_config(variables).seq_dir / "onnx"


def model_options(parser, layers: int = 2, seq: int = 512, build_dir: bool = True) -> None:
    """The options of a benchmark that builds a generated model for the simulator."""
    parser.add_argument("--model", default="bench-qwen2-medium")
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--mode", default="int4")
    if build_dir:
        parser.add_argument("--build-dir", type=Path, help="where to build (default: a new temporary folder)")
