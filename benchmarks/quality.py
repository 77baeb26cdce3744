"""What each mode costs in answers, on a real model: `doit quality` (pipeline/stages/quality.py) as a user
runs it, and its report recorded in benchmarks/results/ (the README's table quotes it).

    .venv/bin/python benchmarks/quality.py [--model smollm2-135m] [--seq 128]
        [--modes bf16,int8,int4,int4_g128] [--tokens 512] [--build-dir DIR] [--dynamic 0] [--jobs 2]
        [--results-name quality_<model>]
The scoring runs each mode's bmodel on the simulator, a task per mode and window: interrupted, it
goes on where it stopped when run again with the same --build-dir (default: the project's build/).
Copies the report (JSON, Markdown, PNG) to benchmarks/results/<results-name>.* (a run of some modes
only, e.g. to add modes to a table measured earlier, names its own files so as not to replace them).
"""
import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_DIR, ROOT  # noqa: E402

DOIT = Path(sys.executable).parent / "doit"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--modes", default="bf16,int8,int4,int4_g128")
    parser.add_argument("--tokens", type=int, default=512, help="tokens scored per mode, at least")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build")
    parser.add_argument("--dynamic", type=int, default=1, help="the builds' dynamic= (0: the prefill over the whole "
                        "window, which a scoring window fills anyway)")
    parser.add_argument("--jobs", type=int, default=2, help="windows scored at once (one core each)")
    parser.add_argument("--results-name", help="the report's name in benchmarks/results/ (default quality_<model>)")
    args = parser.parse_args()
    results_name = args.results_name or f"quality_{args.model}"
    variables = [f"jobs={args.jobs}", f"model={args.model}", f"seq={args.seq}", f"modes={args.modes}",
                 f"quality_tokens={args.tokens}", f"dynamic={args.dynamic}",
                 f"build_dir={args.build_dir}", f"dist_dir={args.build_dir / 'dist'}"]
    start = time.perf_counter()
    subprocess.run([str(DOIT), "quality", *variables], cwd=ROOT, check=True)
    print(f"doit quality: {time.perf_counter() - start:.0f} s (what was not done already)")
    report = args.build_dir / args.model / f"seq{args.seq}" / "quality" / "report.json"
    for suffix in (".json", ".md", ".png"):
        shutil.copyfile(report.with_suffix(suffix), RESULTS_DIR / f"{results_name}{suffix}")
    print((RESULTS_DIR / f"{results_name}.md").read_text())


if __name__ == "__main__":
    main()
