"""Shared set-up of the examples: figures (when matplotlib is there) and a progress bar."""

import os


def figure(out, name, draw, ncols=1, figsize=(6, 4)):
    """Draw a figure with draw(*axes) and save it as out/name; return its path.

    matplotlib is an optional extra (pip install matplotlib, or handgrad[examples]): without
    it the examples print their numbers as usual, say in one line that the figure is
    skipped, and return None here.
    """
    try:
        import matplotlib
    except ImportError:
        print(f"no figure {name}: matplotlib is not installed (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    draw(*axes[0])
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def progress(iterable, total, label):
    """A one-line progress bar on stderr, without dependencies."""
    import sys

    sys.stderr.write(f"{label} [{'.' * 30}] 0/{total}")
    for i, item in enumerate(iterable, start=1):
        yield item
        filled = int(30 * i / total)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {i}/{total}")
        sys.stderr.flush()
    sys.stderr.write("\n")
