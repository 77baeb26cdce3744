"""What each mode costs in answers, on a real model: `doit quality` (pipeline/quality.py) as a user
runs it, and its report recorded in benchmarks/results/ (the README's table quotes it).

    .venv/bin/python benchmarks/quality.py [--model smollm2-135m] [--seq 128]
        [--modes bf16,int8,int4,int4_g128] [--tokens 512] [--build-dir DIR] [--dynamic 0]
The scoring runs each mode's bmodel on the simulator, a task per mode and window: interrupted, it
goes on where it stopped when run again with the same --build-dir (default: the project's build/).
Copies the report (JSON, Markdown, PNG) to benchmarks/results/quality_<model>.*.
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
    args = parser.parse_args()
    variables = [f"model={args.model}", f"seq={args.seq}", f"modes={args.modes}", f"quality_tokens={args.tokens}",
                 f"dynamic={args.dynamic}",
                 f"build_dir={args.build_dir}", f"dist_dir={args.build_dir / 'dist'}"]
    start = time.perf_counter()
    subprocess.run([str(DOIT), "quality", *variables], cwd=ROOT, check=True)
    print(f"doit quality: {time.perf_counter() - start:.0f} s (what was not done already)")
    report = args.build_dir / args.model / f"seq{args.seq}" / "quality" / "report.json"
    for suffix in (".json", ".md", ".png"):
        shutil.copyfile(report.with_suffix(suffix), RESULTS_DIR / f"quality_{args.model}{suffix}")
    print((RESULTS_DIR / f"quality_{args.model}.md").read_text())


if __name__ == "__main__":
    main()
