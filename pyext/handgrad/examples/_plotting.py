"""Shared plotting set-up for the examples: a file backend, and the output folder."""

import os


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out, name):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
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
