"""A small layered DAG layout and its SVG drawing, for the HTML report of ``graphopt report``.

Knows nothing about torch: the caller hands over boxes (in topological order), edges and
outlines. The layout puts each box on the row of its topological rank (longest path from a
source), orders every row by the mean position of its neighbours (a few barycenter sweeps, which
keeps chains straight and crossings few), and draws edges as vertical cubic curves, so data
always flows downwards and no arrowheads are needed.

A tall graph (a ResNet or a transformer is mostly a long chain) is wrapped into columns, read
like a newspaper: rows top to bottom, then the next column. The number of columns makes the
drawing a little wider than it is tall (``ASPECT``), so a 50-200 node graph fits one or two screens
when the page scales it to its pane. An edge that goes on in the next column is drawn as a stub
leaving its producer and a stub entering its consumer, each ending in a small circle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

BOX_W = 150
BOX_H = 34
INNER_H = 18  # one op inside a fused box
GAP_X = 24
GAP_Y = 30
MARGIN = 16
SWEEPS = 4
MAX_LABEL = 22
WAYPOINT_W = 12
ASPECT = 1.2  # width / height the column wrapping aims for (a pane is about this shape)
GAP_COL = 56  # between two columns
MIN_ROWS = 6  # rows in a column at least: a short graph stays one column
ROW_STEP = GAP_Y + 14  # added to a row's height: the gap below it and an outline's label


@dataclass
class Box:
    """One node. ``fill`` is a CSS colour; ``inner`` lists a fused op's inner ops, drawn inside
    a rounded outline; ``style`` is ``""``, ``"new"`` (thick border) or ``"removed"`` (dashed)."""

    key: str
    label: str
    sub: str = ""
    tooltip: str = ""
    fill: str = "#ffffff"
    style: str = ""
    inner: list[Box] = field(default_factory=list)

    @property
    def height(self) -> int:
        return BOX_H if not self.inner else BOX_H + 4 + INNER_H * len(self.inner)


@dataclass
class Drawing:
    boxes: list[Box]  # topological order
    edges: list[tuple[str, str]]  # (producer key, consumer key)
    outlines: list[tuple[str, list[str]]] = field(default_factory=list)  # (label, member keys)


@dataclass
class Placed:
    x: float  # centre
    y: float  # top
    box: Box | None  # None: a waypoint of an edge that skips rows
    height: float = BOX_H
    column: int = 0


@dataclass
class Layout:
    placed: dict[str, Placed]
    routes: list[list[str]]  # each edge as its chain of keys: producer, waypoints, consumer
    width: float
    height: float


def ranks(boxes: Sequence[Box], edges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Longest-path rank of every box; boxes come in topological order."""
    preds: dict[str, list[str]] = {b.key: [] for b in boxes}
    for src, dst in edges:
        if src in preds and dst in preds:
            preds[dst].append(src)
    rank: dict[str, int] = {}
    for b in boxes:
        rank[b.key] = 1 + max((rank[p] for p in preds[b.key]), default=-1)
    return rank


def order_rows(rows: list[list[str]], edges: Sequence[tuple[str, str]]) -> list[list[str]]:
    """Barycenter ordering: sweep down (by producers) and up (by consumers) a few times."""
    preds: dict[str, list[str]] = {k: [] for row in rows for k in row}
    succs: dict[str, list[str]] = {k: [] for row in rows for k in row}
    for src, dst in edges:
        preds[dst].append(src)
        succs[src].append(dst)

    for sweep in range(SWEEPS):
        down = sweep % 2 == 0
        near = preds if down else succs
        for r in range(1, len(rows)) if down else range(len(rows) - 2, -1, -1):
            pos = {k: i - (len(row) - 1) / 2 for row in rows for i, k in enumerate(row)}
            rows[r] = sorted(rows[r], key=lambda k: _mean([pos[n] for n in near[k]], pos[k]))
    return rows


def _mean(values: list[float], default: float) -> float:
    return sum(values) / len(values) if values else default


def _routes(drawing: Drawing, rank: dict[str, int], rows: list[list[str]]) -> list[list[str]]:
    """Every edge as a chain of keys; an edge that skips rows gets a waypoint on each row it
    crosses, so the ordering gives it a lane of its own instead of drawing it through boxes."""
    routes = []
    for src, dst in drawing.edges:
        if src not in rank or dst not in rank:
            continue
        chain = [src]
        for r in range(rank[src] + 1, rank[dst]):
            waypoint = f"\0{len(routes)}:{r}"
            rows[r].append(waypoint)
            chain.append(waypoint)
        routes.append([*chain, dst])
    return routes


def columns(heights: Sequence[float], widths: Sequence[float]) -> list[int]:
    """The first row of each column: the rows split, in order, into columns of about equal
    height, as many as make the drawing's width / height closest to ``ASPECT`` (each column as
    wide as its widest row)."""
    if not heights:
        return [0]
    best: tuple[float, list[int]] | None = None
    for count in range(1, max(1, len(heights) // MIN_ROWS) + 1):
        starts = _split(heights, count)
        bounds = list(zip(starts, [*starts[1:], len(heights)]))
        width = sum(max(widths[a:b]) + GAP_COL for a, b in bounds) - GAP_COL
        height = max(sum(heights[a:b]) for a, b in bounds)
        miss = abs(math.log(max(width, 1.0) / max(height, 1.0) / ASPECT))
        if best is None or miss < best[0]:
            best = (miss, starts)
    assert best is not None
    return best[1]


def _split(heights: Sequence[float], count: int) -> list[int]:
    """First rows of ``count`` consecutive runs of rows of about equal total height."""
    total, starts, height = sum(heights), [0], 0.0
    for r, h in enumerate(heights):
        if height >= total / count * len(starts) and len(starts) < count:
            starts.append(r)
        height += h
    return starts


def layout(drawing: Drawing) -> Layout:
    """Place every box and waypoint, row by row, wrapping the rows into columns."""
    rank = ranks(drawing.boxes, drawing.edges)
    rows: list[list[str]] = [[] for _ in range(max(rank.values(), default=-1) + 1)]
    for b in drawing.boxes:
        rows[rank[b.key]].append(b.key)
    routes = _routes(drawing, rank, rows)
    segments = [(a, b) for chain in routes for a, b in zip(chain, chain[1:])]
    rows = order_rows(rows, segments)
    by_key = {b.key: b for b in drawing.boxes}

    def width_of(key: str) -> int:
        return BOX_W if key in by_key else WAYPOINT_W

    row_widths = [sum(width_of(k) + GAP_X for k in row) - GAP_X for row in rows]
    row_heights = [
        max((by_key[k].height for k in row if k in by_key), default=BOX_H) for row in rows
    ]
    starts = columns([h + ROW_STEP for h in row_heights], row_widths)
    placed: dict[str, Placed] = {}
    left, bottom = float(MARGIN), 0.0
    for c, (first, end) in enumerate(zip(starts, [*starts[1:], len(rows)])):
        col_w = max(row_widths[first:end], default=0)
        y = float(MARGIN + 14)  # room for the label of an outline around the first row
        for r in range(first, end):
            x = left + (col_w - row_widths[r]) / 2
            for key in rows[r]:
                box = by_key.get(key)
                height = box.height if box else row_heights[r]
                placed[key] = Placed(x + width_of(key) / 2, y, box, height, c)
                x += width_of(key) + GAP_X
            y += row_heights[r] + ROW_STEP
        left += col_w + GAP_COL
        bottom = max(bottom, y)
    return Layout(placed, routes, left - GAP_COL + MARGIN, bottom + MARGIN)


def _clip(text: str, n: int = MAX_LABEL) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _box_svg(p: Placed) -> str:
    b = p.box
    assert b is not None
    x0 = p.x - BOX_W / 2
    cls = "node" + (f" {b.style}" if b.style else "") + (" fused" if b.inner else "")
    parts = [
        f'<g class="{cls}" data-node="{escape(b.key)}"><title>{escape(b.tooltip)}</title>',
        f'<rect x="{x0:.1f}" y="{p.y:.1f}" width="{BOX_W}" height="{b.height}" '
        f'rx="{10 if b.inner else 3}" fill="{b.fill}"/>',
        f'<text x="{p.x:.1f}" y="{p.y + 14:.1f}" class="op">{escape(_clip(b.label))}</text>',
        f'<text x="{p.x:.1f}" y="{p.y + 27:.1f}" class="sub">{escape(_clip(b.sub, 26))}</text>',
    ]
    for i, inner in enumerate(b.inner):
        iy = p.y + BOX_H + i * INNER_H
        parts.append(
            f'<g class="inner"><title>{escape(inner.tooltip)}</title>'
            f'<rect x="{x0 + 8:.1f}" y="{iy:.1f}" width="{BOX_W - 16}" height="{INNER_H - 3}" '
            f'rx="2" fill="{inner.fill}"/>'
            f'<text x="{p.x:.1f}" y="{iy + 11:.1f}" class="sub">'
            f"{escape(_clip(inner.label, 24))}</text></g>"
        )
    parts.append("</g>")
    return "".join(parts)


STUB = 12  # length of an edge's stub where it leaves one column and enters the next


def _edge_svg(chain: list[Placed]) -> str:
    """A vertical cubic curve between rows, straight down through each waypoint's row; where
    the chain goes on in the next column, a stub out of the producer's column and a stub into
    the consumer's, each ending in a small circle."""
    first = chain[0]
    path = [f"M{first.x:.1f},{first.y + first.height:.1f}"]
    jumps = []
    for a, b in zip(chain, chain[1:]):
        y0, y1 = a.y + a.height, b.y
        if a.column != b.column:
            path.append(f"L{a.x:.1f},{y0 + STUB:.1f} M{b.x:.1f},{y1 - STUB:.1f}")
            jumps += [(a.x, y0 + STUB), (b.x, y1 - STUB)]
        else:
            mid = (y0 + y1) / 2
            path.append(f"C{a.x:.1f},{mid:.1f} {b.x:.1f},{mid:.1f} {b.x:.1f},{y1:.1f}")
        if a.column != b.column:
            path.append(f"L{b.x:.1f},{y1:.1f}")
        if b.box is None:
            path.append(f"L{b.x:.1f},{b.y + b.height:.1f}")
    circles = "".join(f'<circle class="jump" cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in jumps)
    return f'<path class="edge" d="{" ".join(path)}"/>' + circles


def _outline_svg(label: str, members: list[Placed]) -> str:
    pad = 7
    x0 = min(p.x for p in members) - BOX_W / 2 - pad
    x1 = max(p.x for p in members) + BOX_W / 2 + pad
    y0 = min(p.y for p in members) - pad
    y1 = max(p.y + p.height for p in members) + pad
    return (
        f'<g class="outline"><rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" '
        f'height="{y1 - y0:.1f}" rx="12"/>'
        f'<text x="{x0 + 6:.1f}" y="{y0 - 3:.1f}">{escape(_clip(label, 40))}</text></g>'
    )


def render(drawing: Drawing, caption: str = "") -> str:
    """The drawing as one inline ``<svg>`` element (no ids, so copies of it may coexist)."""
    lay = layout(drawing)
    at = lay.placed
    edges = [_edge_svg([at[k] for k in chain]) for chain in lay.routes]
    outlines = [
        _outline_svg(label, [at[k] for k in keys if k in at])
        for label, keys in drawing.outlines
        if any(k in at for k in keys)
    ]
    boxes = [_box_svg(p) for p in at.values() if p.box is not None]
    return (
        f'<svg class="graph" width="{lay.width:.0f}" height="{lay.height:.0f}" '
        f'viewBox="0 0 {lay.width:.0f} {lay.height:.0f}" data-nodes="{len(boxes)}" '
        f'data-columns="{1 + max((p.column for p in at.values()), default=0)}">'
        f"<title>{escape(caption)}</title>" + "".join(edges + outlines + boxes) + "</svg>"
    )
