"""The one plotting style of the run report (moco_ray.report) and the sweep results (tune.results):
matplotlib's Agg backend (no display on a cluster node or in CI), 100 dpi, a light grid, and each
figure closed once saved (a report draws several and a sweep one per plot)."""

DPI = 100


def figure(title=None, figsize=(8, 4.5), grid=True, title_size=None):
    """A new (figure, axes) in the project's style; `grid=False` for images such as a heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, dpi=DPI)
    if title is not None:
        ax.set_title(title, fontsize=title_size)
    if grid:
        ax.grid(True, alpha=0.3)
    return fig, ax


def save(fig, path):
    """Write `fig` to `path` (a PNG) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
