"""Matplotlib figures as PNG embedded in self-contained HTML pages (the data report, the eval report)."""

from __future__ import annotations

import base64
import io


def figure(width: float, height: float):
    """A new (figure, axes) on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def png_base64(fig) -> str:
    """The figure as base64 PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def img_tag(fig) -> str:
    """The figure as an <img class="plot"> with the PNG inline (the eval report checks these render)."""
    return f'<img class="plot" alt="plot" src="data:image/png;base64,{png_base64(fig)}">'
