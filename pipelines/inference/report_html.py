"""The build report as one self-contained HTML page: inline CSS and SVG charts, no script, no external URL.

Why hand-written SVG rather than image files: the page is one file a user can mail, open offline or attach
to a ticket, and its numbers stay text (searchable, copyable). Every figure is a ``<figure id="fig-...">``
listed in the page's table of contents, so a reader (or a test) can check that each one named is there.
"""
from __future__ import annotations

import json
from html import escape

from pipelines.inference.report_data import BuildReport, ChunkExample, NeighborsSummary, StageRow

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1080px;padding:16px 24px;color:#1d232a}
h1{font-size:22px;margin:8px 0}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dee4;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 10px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
th{background:#f3f5f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
figure{margin:10px 0}figcaption{color:#57606a;font-size:12.5px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #d8dee4;border-radius:6px;padding:6px 12px;min-width:110px}
.card b{display:block;font-size:18px}.chunk{border-left:3px solid #2f6fad;padding:4px 10px;margin:10px 0;background:#f6f8fa}
.nb{border-left:3px solid #9db4cc;margin:4px 0 4px 18px;padding:2px 8px}.muted{color:#57606a}
svg text{font:11px system-ui,sans-serif;fill:#1d232a}
"""
BAR = "#2f6fad"


def fmt(value: float | int | None, digits: int = 3) -> str:
    """A figure as the page prints it ('-' when the build did not record it)."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def hbar_chart(fig_id: str, title: str, labels: list[str], values: list[float], unit: str = "") -> str:
    """A horizontal bar chart as inline SVG, one labelled bar per value, inside a ``<figure>``."""
    width, label_w, row_h, value_w = 760, 300, 20, 90
    top = max(values) if values and max(values) > 0 else 1
    rows = []
    for i, (label, v) in enumerate(zip(labels, values)):
        y = i * row_h
        w = (width - label_w - value_w) * v / top
        short = label if len(label) <= 48 else "..." + label[-45:]
        rows.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end"><title>{escape(label)}</title>{escape(short)}</text>'
                    f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{BAR}"/>'
                    f'<text x="{label_w + w + 4:.1f}" y="{y + 14}">{escape(fmt(v, 2))}{escape(unit)}</text>')
    height = max(1, len(labels)) * row_h
    return (f'<figure id="{fig_id}"><svg width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">{"".join(rows)}</svg>'
            f'<figcaption>{escape(title)}</figcaption></figure>')


def histogram_chart(fig_id: str, title: str, edges: list[float], counts: list[int]) -> str:
    """A histogram as inline SVG: one column per bin, the bin edges on the axis."""
    width, height, pad_l, pad_b = 760, 220, 50, 30
    plot_w, plot_h = width - pad_l - 30, height - pad_b - 10
    top = max(counts) if counts and max(counts) > 0 else 1
    n = max(1, len(counts))
    cols = []
    for i, c in enumerate(counts):
        h = plot_h * c / top
        x = pad_l + i * plot_w / n
        cols.append(f'<rect x="{x:.1f}" y="{10 + plot_h - h:.1f}" width="{plot_w / n - 1:.1f}" height="{h:.1f}" fill="{BAR}">'
                    f'<title>{edges[i]:.4g} - {edges[i + 1]:.4g}: {c:,}</title></rect>')
    axis = [f'<line x1="{pad_l}" y1="{10 + plot_h}" x2="{pad_l + plot_w}" y2="{10 + plot_h}" stroke="#57606a"/>',
            f'<text x="{pad_l - 4}" y="18" text-anchor="end">{top:,}</text>',
            f'<text x="{pad_l - 4}" y="{10 + plot_h}" text-anchor="end">0</text>']
    for i in range(0, len(edges), max(1, len(edges) // 5)):
        x = pad_l + i * plot_w / n
        axis.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle">{edges[i]:.3g}</text>')
    return (f'<figure id="{fig_id}"><svg width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">{"".join(axis + cols)}</svg>'
            f'<figcaption>{escape(title)}</figcaption></figure>')


def table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """An HTML table; the cells are already escaped; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>' for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def stages_section(stages: list[StageRow]) -> str:
    rows = [[escape(s.stage), f"<code>{escape(s.folder)}</code>", escape(s.finished_at),
             ("~" if s.estimated else "") + fmt(s.seconds, 1),
             escape(", ".join(f"{k} {fmt(v)}" for k, v in s.counts.items()))] for s in stages]
    timed = [s for s in stages if s.seconds is not None]
    chart = hbar_chart("fig-stages", "Seconds per stage (~: time since the previous stage's manifest)",
                       [s.stage for s in timed], [float(s.seconds) for s in timed], " s") if timed else ""
    return ("<h2 id=stages>Stages</h2>" + table(["stage", "manifest", "finished (UTC)", "seconds", "counts"], rows, {3})
            + chart)


def neighbors_section(nb: NeighborsSummary) -> str:
    facts = [["version", escape(nb.version)], ["k", fmt(nb.k)], ["rows", fmt(nb.rows)],
             ["rows padded with -1", fmt(nb.rows_with_pads)],
             [f"recall@{nb.k} of the stored neighbors (held-out sample vs exact search)", fmt(nb.recall_at_k)],
             ["candidates searched per chunk", fmt(nb.candidates)], ["CPU ms per chunk", fmt(nb.cpu_ms_per_chunk)]]
    chart = histogram_chart("fig-distances", f"Stored neighbor distances ({nb.distances_sampled:,} sampled)",
                            nb.distance_edges, nb.distance_counts) if nb.distance_counts else ""
    return "<h2 id=neighbors>Neighbors</h2>" + table(["", ""], facts, {1}) + chart


def example_html(ex: ChunkExample) -> str:
    nbs = "".join(f'<div class=nb><span class=muted>chunk {n.chunk_id} &middot; distance {n.distance:.4f} &middot; '
                  f'{escape(n.source)}</span><br>{escape(n.text)}</div>' for n in ex.neighbors)
    return (f'<div class=chunk><span class=muted>chunk {ex.chunk_id} &middot; {escape(ex.source)}</span><br>'
            f'{escape(ex.text)}</div>{nbs or "<div class=nb muted>no stored neighbors</div>"}')


def render_report(r: BuildReport) -> str:
    """The whole page for ``r``: summary cards, stages, sources, quarantine, index, neighbors, versions, examples.

    Args:
        r: what :func:`pipelines.inference.report_data.collect_report` read from the build.

    Returns:
        A complete HTML document with no reference to anything outside it.
    """
    cards = "".join(f"<div class=card><b>{fmt(v)}</b>{escape(k.replace('_', ' '))}</div>" for k, v in r.totals.items())
    sources = ("<h2 id=sources>Sources</h2>"
               + hbar_chart("fig-sources", "Chunks per input file", [s.source for s in r.sources], [s.chunks for s in r.sources])
               + table(["input file", "documents", "chunks"],
                       [[escape(s.source), fmt(s.documents), fmt(s.chunks)] for s in r.sources], {1, 2}))
    if r.quarantine:
        quarantine = ("<h2 id=quarantine>Quarantine</h2>"
                      + hbar_chart("fig-quarantine", "Quarantined inputs by reason", [q.reason for q in r.quarantine],
                                   [q.count for q in r.quarantine])
                      + table(["reason", "count", "examples (source: detail)"],
                              [[escape(q.reason), fmt(q.count),
                                "<br>".join(f"<code>{escape(s)}</code>: {escape(d)}" for s, d in q.examples)]
                               for q in r.quarantine], {1}))
    else:
        quarantine = "<h2 id=quarantine>Quarantine</h2><p>Nothing was quarantined: every input became chunks.</p>"
    ix = r.index
    index = "<h2 id=index>Index</h2>" + table(["", ""], [
        ["version", escape(ix.version)], ["key", f"<code>{escape(ix.key)}</code>"], ["why this key", escape(ix.key_reason)],
        ["metric", escape(ix.metric)], ["layout", escape(ix.layout)], ["vectors", fmt(ix.vectors)], ["dimension", fmt(ix.dim)],
        ["size (MiB)", fmt(ix.size_bytes / 2**20, 1)], ["search settings chosen by the tuner", f"<code>{escape(ix.search_params)}</code>"],
        ["exact re-rank candidates", fmt(ix.rerank_candidates)], ["recall@k of the index (tuner's sample)", fmt(ix.recall_at_k)],
        ["target recall", fmt(ix.target_recall)], ["ms per query", fmt(ix.query_ms)], ["build seconds", fmt(ix.build_seconds, 1)]],
        {1})
    v = r.versions
    history = (table(["time", "action", "reason", "documents +/~/-", "versions"],
                     [[escape(str(h.get("time", ""))), escape(str(h.get("action", ""))), escape(str(h.get("reason", ""))),
                       f"{h.get('documents_added', 0)}/{h.get('documents_changed', 0)}/{h.get('documents_removed', 0)}",
                       escape(json.dumps(h.get("version", {})))] for h in reversed(v.history)])
               if v.history else "<p>No re-index has run on this build (no <code>history.jsonl</code>).</p>")
    versions = ("<h2 id=versions>Versions</h2>" + f"<p>LATEST: <code>{escape(json.dumps(v.latest, sort_keys=True))}</code></p>"
                + table(["kind", "complete versions"], [["index", escape(", ".join(v.index_versions))],
                                                        ["neighbors", escape(", ".join(v.neighbors_versions))]])
                + history)
    examples = "<h2 id=examples>Example chunks and their stored neighbors</h2>" + "".join(example_html(e) for e in r.examples)
    body = "".join([stages_section(r.stages), sources, quarantine, index, neighbors_section(r.neighbors), versions, examples])
    figures = [f for f in ("fig-stages", "fig-sources", "fig-quarantine", "fig-distances") if f'id="{f}"' in body]
    toc = " &middot; ".join(f'<a href="#{f}">{f.removeprefix("fig-")}</a>' for f in figures)
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>retroforge build report: {escape(r.data_url)}</title><style>{CSS}</style></head><body>"
            f"<h1>Build report</h1><p class=mono>{escape(r.data_url)}</p><p class=muted>generated {escape(r.generated_at)}</p>"
            f"<div class=cards>{cards}</div><p id=figures>Figures: {toc}</p>{body}</body></html>\n")
