"""Parts of the HTML reports shared by the run report and the observability report: number
formatting, tables, embedded figures, sections, and the description of the machine (read by
the reports and recorded by the executors in environment.json)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..engine.store import atomic_write_bytes  # noqa: E402
from ..verdicts import fmt_sym as fmt  # noqa: E402  (one number format for every page)

__all__ = ["fmt", "img", "plt", "save_figure", "section", "table"]


def table(df: pd.DataFrame, limit: int = 200) -> str:
    if df.empty:
        return "<p>none</p>"
    shown = df.head(limit).map(lambda v: fmt(v) if isinstance(v, float) else v)
    more = f"<p>… {len(df) - limit} more rows in the data files.</p>" if len(df) > limit else ""
    return shown.to_html(index=False, escape=True, classes="t") + more


def save_figure(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def img(p: Path) -> str:
    data = base64.b64encode(p.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(p.name)}</figcaption></figure>")


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>'
