"""The reports' figures: a matplotlib figure drawn by the caller, saved whole as a PNG."""
from contextlib import contextmanager
from pathlib import Path

from .fsutil import atomic_path


@contextmanager
def png_figure(out: Path, **subplots):
    """Yields (figure, axes) of `plt.subplots(**subplots)`, with no display needed; saved to `out`
    atomically when the block ends without an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
