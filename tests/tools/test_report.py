"""``graphopt report``: the page's structure, its numbers and colours, and that it renders in
headless Chromium with no console error.

The browser tests need Debian's ``chromium`` (``apt-get install -y --no-install-recommends
chromium``; ``.ci/run`` installs it). Without it they fail and say so: the page is only known to
work once a browser has run its script.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.fx import GraphModule, Node

import graphopt
from graphopt import Contract, Pass, PassResult
from graphopt.ir.rewriter import Rewriter, apply_rules
from graphopt.pipeline.parse import parse_pipeline
from graphopt.pipeline.passes import PassContext
from graphopt.tools import report, svg
from graphopt.tools.cli import load_model, main
from graphopt.tools.debug import pass_labels

GREEN, RED = report.SCALE[0][1], report.SCALE[-1][1]
FUSION = "cleanup,fuse-epilogue{measure=false},fuse-pointwise{measure=false}"
# -O2 with every fusion kept whether or not it measures faster, so the page is deterministic
O2_UNMEASURED = (
    "cleanup,fold-bn,patterns,cleanup,fuse-epilogue{measure=false},"
    "fuse-kernels{measure=false},fuse-pointwise{measure=false,max_ops=32},cleanup"
)

TINY = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        z = torch.relu(y) * 0.5 + 1.0  # a pointwise group; y is also returned: a near miss
        return torch.sigmoid(self.b(torch.tanh(z))), y


def build(batch: int = 4):
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(batch, 8),)
"""


@graphopt.register_pass
@dataclass(frozen=True)
class WrongRelu(Pass):
    """A planted bug: relu(x) -> clamp_min(x, -0.5), which lets negatives through."""

    name = "report-test-wrong-relu"
    contract = Contract.rounding()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)

        def rewrite(node: Node, rw: Rewriter) -> bool:
            # relu(x) -> clamp_min(x, -0.5)   (wrong on purpose)
            new = rw.call(
                torch.ops.aten.clamp_min.default, (node.args[0], -0.5), before=node, sources=[node]
            )
            rw.replace(node, new)
            return rw.applied("relu->clamp")

        apply_rules(gm, [((torch.ops.aten.relu.default,), rewrite)], rw)
        return PassResult(rw.rewrites > 0)


# -- a small DOM, from html.parser ----------------------------------------------------------------

VOID = {"meta", "br", "input", "img", "link", "hr", "area", "base", "col", "source", "wbr"}


@dataclass
class El:
    tag: str
    attrs: dict[str, str]
    children: list[El] = field(default_factory=list)
    text: str = ""

    def iter(self) -> Any:
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str, cls: str | None = None) -> list[El]:
        return [
            e
            for e in self.iter()
            if e.tag == tag and (cls is None or cls in e.attrs.get("class", "").split())
        ]

    def by_id(self, element_id: str) -> El:
        found = [e for e in self.iter() if e.attrs.get("id") == element_id]
        assert len(found) == 1, f"expected one #{element_id}, found {len(found)}"
        return found[0]

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class Dom(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = El("#root", {})
        self.stack = [self.root]
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = El(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(el)
        if tag not in VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(El(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text += data


def parse(text: str) -> El:
    return Dom(text).root


# -- the pages, each rendered once -----------------------------------------------------------------


@dataclass
class Page:
    path: Path
    folder: Path
    text: str
    dom: El
    entries: list[dict[str, Any]]

    def svg(self, key: str) -> El:
        holder = self.dom.by_id(f"svg-{key}")
        (picture,) = [c for c in holder.children if c.tag == "svg"]
        return picture

    def entry(self, label: str) -> dict[str, Any]:
        (found,) = [e for e in self.entries if e["label"].startswith(label)]
        return found


def render(base: Path, name: str, *argv: str) -> Page:
    path, folder = base / f"{name}.html", base / f"{name}-run"
    assert main(["report", *argv, "-o", str(path), "--out", str(folder)]) == 0
    text = path.read_text()
    dom = parse(text)
    entries = json.loads(dom.by_id("entries").all_text())
    return Page(path, folder, text, dom, entries)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Page]:
    base = tmp_path_factory.mktemp("report")
    tiny = base / "tiny.py"
    tiny.write_text(TINY)
    return {
        "mlp": render(base, "mlp", "mlp", "--pipeline", O2_UNMEASURED),
        "mlp-O2": render(base, "mlp-O2", "mlp", "--pipeline", "-O2"),
        "resnet": render(base, "resnet", "resnet", "--batch", "2", "--pipeline", "-O1"),
        "tiny": render(base, "tiny", f"{tiny}:build", "--pipeline", FUSION),
        "planted": render(base, "planted", "mlp", "--pipeline", "cleanup,report-test-wrong-relu"),
    }


def fills(picture: El, cls: str = "node") -> dict[str, str]:
    """node key -> fill colour of its box."""
    out = {}
    for g in picture.find_all("g", cls):
        rect = next(c for c in g.children if c.tag == "rect")
        key = g.attrs.get("data-node") or next(c for c in g.children if c.tag == "title").text
        out[key] = rect.attrs["fill"]
    return out


# -- structure, without a browser -------------------------------------------------------------------


def test_timeline_has_one_bar_per_pass_in_pipeline_order(pages: dict[str, Page]) -> None:
    # measured -O2 on the CPU keeps what measures faster: the bars are there either way
    measured = pages["mlp-O2"].dom.by_id("timeline").find_all("div", "bar")
    assert len(measured) == len(pass_labels(parse_pipeline("-O2"))) == 20
    page = pages["mlp"]
    labels = pass_labels(parse_pipeline(O2_UNMEASURED))
    bars = page.dom.by_id("timeline").find_all("div", "bar")
    assert len(bars) == len(labels) == 20
    rows = [r for r in page.dom.by_id("passes").find_all("tr") if "data-record" in r.attrs]
    assert [r.find_all("td")[1].text for r in rows] == labels
    # bar width ~ time: flex-grow is pass ms + verify ms of the same row of the table
    for bar, row in zip(bars, rows):
        cells = [td.text for td in row.find_all("td")]
        grow = float(re.search(r"flex-grow:([\d.]+)", bar.attrs["style"]).group(1))  # type: ignore[union-attr]
        assert grow == pytest.approx(float(cells[3]) + float(cells[4]), abs=0.011)
    statuses = [r.find_all("td")[8].text for r in rows]
    assert statuses.count("ok") == 4 and set(statuses) == {"ok", "unchanged"}
    assert "rolled-back" not in " ".join(b.attrs["class"] for b in bars)


def test_one_svg_per_shown_graph_and_no_external_urls(pages: dict[str, Page]) -> None:
    for page in pages.values():
        store = page.dom.by_id("svg-store")
        keys = {e[side] for e in page.entries for side in ("before", "after")}
        assert len(store.find_all("svg")) == len(keys)
        assert {c.attrs["data-svg"] for c in store.children if c.tag == "div"} == keys
        assert not re.search(r"https?:|//[a-z]|url\(|@import", page.text)
        assert not [e for e in page.dom.iter() if "src" in e.attrs or "href" in e.attrs]
        assert not page.dom.find_all("link")


def test_captured_graph_is_drawn_node_for_node_in_green(pages: dict[str, Page]) -> None:
    page = pages["mlp"]
    model, inputs = load_model("mlp", None)
    captured = graphopt.capture(model, inputs)
    drawn = [n.name for n in captured.graph.nodes if n.op != "get_attr"]
    first = page.entries[0]  # cleanup:remove-noops: its "before" is the captured graph
    picture = page.svg(first["before"])
    assert int(picture.attrs["data-nodes"]) == len(drawn) == 11
    colours = fills(picture)
    assert set(colours) == set(drawn)
    # fp32 against float64: every compared node is far below 1e-6; input and output aren't
    # compared (no float counterpart: the input is itself, the output is a list)
    computes = [n.name for n in captured.graph.nodes if n.op == "call_function"]
    assert {colours[n] for n in computes} == {GREEN}
    assert colours["output"] == report.NO_REF_COLOUR
    legend = page.dom.by_id("legend").all_text()
    legend_html = page.text.split('id="legend"')[1].split("</div>")[0]
    for _, colour, label in report.SCALE:
        assert colour in legend_html and label in legend
    assert "NaN / inf" in legend and "not compared" in legend


def test_fold_bn_and_epilogue_outline_the_nodes_they_replaced(pages: dict[str, Page]) -> None:
    page = pages["mlp"]
    fold = page.entry("fold-bn")
    before, after = page.svg(fold["before"]), page.svg(fold["after"])
    outlines = before.find_all("g", "outline")
    assert len(outlines) == 2  # linear+batch_norm, twice
    assert all(o.find_all("text")[0].text.startswith("-> linear") for o in outlines)
    removed = {g.attrs["data-node"] for g in before.find_all("g", "removed")}
    assert removed == {"linear", "batch_norm", "linear_1", "batch_norm_1"}
    assert len(after.find_all("g", "new")) == 2
    assert int(after.attrs["data-nodes"]) == int(before.attrs["data-nodes"]) - 2
    epilogue = page.entry("fuse-epilogue")
    labels = [
        o.find_all("text")[0].text for o in page.svg(epilogue["before"]).find_all("g", "outline")
    ]
    assert len(labels) == 2 and all(t.startswith("-> graphopt.linear") for t in labels)


def test_fused_op_is_drawn_with_its_inner_ops(pages: dict[str, Page]) -> None:
    page = pages["tiny"]
    fuse = page.entry("fuse-pointwise")
    (fused,) = page.svg(fuse["after"]).find_all("g", "fused")
    inner = fused.find_all("g", "inner")
    assert [g.find_all("text")[0].text for g in inner] == [
        "relu",
        "mul.Tensor",
        "add.Tensor",
        "tanh",
    ]
    # every inner op has its counterpart in the captured graph, computed in fp32: green
    assert {g.find_all("rect")[0].attrs["fill"] for g in inner} == {GREEN}
    assert "rel L2" in inner[0].find_all("title")[0].text
    (outline,) = page.svg(fuse["before"]).find_all("g", "outline")
    assert outline.find_all("text")[0].text.startswith("-> fused %fused")


def test_near_misses_table_lists_rule_node_and_reason(pages: dict[str, Page]) -> None:
    page = pages["tiny"]
    rules = [
        [td.text for td in tr.find_all("td")] for tr in page.dom.by_id("rules").find_all("tr")[1:]
    ]
    assert ["fuse-epilogue", "linear+act", "1", "1"] in rules
    misses = [
        [td.text for td in tr.find_all("td")] for tr in page.dom.by_id("misses").find_all("tr")[1:]
    ]
    assert misses == [
        ["fuse-epilogue", "linear+act", "%relu", "%linear is also used by 1 other node(s)"]
    ]
    assert "No fusion rule ran" in pages["resnet"].dom.by_id("no-rules").text


def test_rolled_back_pass_shows_its_rejected_graph_in_red(pages: dict[str, Page]) -> None:
    page = pages["planted"]
    bars = page.dom.by_id("timeline").find_all("div", "bar")
    assert "rolled-back" in bars[-1].attrs["class"]
    entry = page.entry("report-test-wrong-relu")
    assert "[rolled back: the rejected graph]" in entry["label"]
    assert "report-test-wrong-relu" in entry["note"]  # the pass manager's EquivalenceError
    before, after = fills(page.svg(entry["before"])), fills(page.svg(entry["after"]))
    assert before["relu"] == GREEN and before["relu_1"] == GREEN
    clamps = [k for k in after if k.startswith("clamp_min")]
    assert len(clamps) == 2 and {after[k] for k in clamps} == {RED}
    assert after["linear_2"] == RED  # the error propagates to the output layer


def test_environment_command_and_run_folder(pages: dict[str, Page]) -> None:
    page = pages["mlp"]
    env = {
        tr.find_all("th")[0].text: tr.find_all("td")[0].text
        for tr in page.dom.by_id("environment").find_all("tr")
    }
    assert set(env) >= {"torch", "triton", "onnx", "graphopt", "python", "gpu"}
    assert env["torch"] == torch.__version__ and env["graphopt"] == graphopt.__version__
    command = f"graphopt report mlp '--pipeline={O2_UNMEASURED}' -o {page.path}"
    assert page.dom.by_id("command").text == command
    saved = json.loads((page.folder / "environment.json").read_text())
    assert saved["torch"] == torch.__version__ and set(saved) >= set(env)
    assert (page.folder / "report.html").read_text() == page.text


def test_default_folder_holds_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["report", "mlp", "--pipeline", "cleanup"]) == 0
    (folder,) = (tmp_path / "report-out").iterdir()
    assert folder.name.startswith("mlp-")
    assert {p.name for p in folder.iterdir()} == {"environment.json", "report.html"}
    assert (
        f"report written to {Path('report-out') / folder.name / 'report.html'}"
        in capsys.readouterr().out
    )


def test_output_that_is_a_folder_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "mlp", "-o", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    out = capsys.readouterr().out
    assert "GraphoptError" in out and "is a folder" in out and "report.html" in out
    assert not (tmp_path / "run").exists()


class Flatten(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.reshape(x.shape[0], -1) * self.scale)


def test_weights_and_shape_values_are_not_drawn() -> None:
    gm = graphopt.capture(Flatten(), (torch.randn(4, 3, 4),))
    ops = {n.name: n.op for n in gm.graph.nodes}
    picture = report.drawing(gm, {})
    keys = {b.key for b in picture.boxes}
    hidden = {n.name for n in gm.graph.nodes if n.op == "get_attr" or "sym_size" in n.name}
    assert any("sym_size" in k for k in hidden) and any(ops[k] == "get_attr" for k in hidden)
    assert keys == set(ops) - hidden
    assert {k for edge in picture.edges for k in edge} <= keys


def test_layout_gives_a_skip_edge_its_own_lane() -> None:
    # a -> b -> c -> d and a -> d: d is on row 3; a -> d crosses rows 1 and 2 beside b and c
    boxes = [svg.Box(k, k) for k in "abcd"]
    drawing = svg.Drawing(boxes, [("a", "b"), ("b", "c"), ("c", "d"), ("a", "d")])
    lay = svg.layout(drawing)
    assert svg.ranks(boxes, drawing.edges) == {"a": 0, "b": 1, "c": 2, "d": 3}
    skip = [chain for chain in lay.routes if chain[0] == "a" and chain[-1] == "d"]
    assert len(skip) == 1 and len(skip[0]) == 4
    for waypoint, box in zip(skip[0][1:3], "bc"):
        w, b = lay.placed[waypoint], lay.placed[box]
        assert w.y == b.y and abs(w.x - b.x) >= (svg.BOX_W + svg.WAYPOINT_W) / 2
    rows: dict[float, list[svg.Placed]] = {}
    for p in lay.placed.values():
        rows.setdefault(p.y, []).append(p)
    assert len(rows) == 4
    for row in rows.values():  # nothing overlaps within a row
        xs = sorted(row, key=lambda p: p.x)
        for left, right in zip(xs, xs[1:]):
            assert right.x - left.x >= svg.WAYPOINT_W + svg.GAP_X - 1e-6


def test_a_long_chain_reads_in_columns_about_as_wide_as_tall() -> None:
    # 120 ops in a chain: one column would be 120 rows (9,000+ px) tall and one box wide
    boxes = [svg.Box(f"n{i}", f"op{i}") for i in range(120)]
    edges = [(f"n{i}", f"n{i + 1}") for i in range(119)] + [("n3", "n40")]  # a skip edge too
    lay = svg.layout(svg.Drawing(boxes, edges))
    used = {p.column for p in lay.placed.values()}
    assert len(used) >= 4 and used == set(range(len(used)))
    assert 0.5 <= lay.width / lay.height <= 2.0
    order = [lay.placed[f"n{i}"] for i in range(120)]  # read column by column, top to bottom
    assert [p.column for p in order] == sorted(p.column for p in order)
    for a, b in zip(order, order[1:]):
        assert b.y > a.y or b.column == a.column + 1
    for p in lay.placed.values():
        assert 0 <= p.x - svg.BOX_W / 2 and p.x + svg.BOX_W / 2 <= lay.width
    # an edge that goes on in the next column: two stubs, each ending in a circle
    text = svg.render(svg.Drawing(boxes, edges))
    crossing = [
        (a, b)
        for chain in lay.routes
        for a, b in zip(chain, chain[1:])
        if lay.placed[a].column != lay.placed[b].column
    ]
    assert len(crossing) >= len(used) - 1  # the chain itself crosses every column break
    assert text.count('<circle class="jump"') == 2 * len(crossing)
    assert f'data-columns="{len(used)}"' in text
    # a short graph stays one column
    small = svg.layout(svg.Drawing(boxes[:5], edges[:4]))
    assert {p.column for p in small.placed.values()} == {0}


def test_removed_weights_are_named_where_no_node_shows_them(pages: dict[str, Page]) -> None:
    # resnet -O1: fold-bn leaves the batch norms' and convs' old weights unused; dce removes them
    notes = [e["note"] for e in pages["resnet"].entries if e["label"].startswith("cleanup:dce")]
    assert any(re.search(r"Removed \d+ weight\(s\)/constant\(s\) that are not drawn", n)
               for n in notes), notes  # fmt: skip
    assert report.removed_note([]) == ""
    assert report.removed_note(list("abcdefghij"), shown=3) == (
        "Removed 10 weight(s)/constant(s) that are not drawn as nodes: a, b, c, ... (7 more)."
    )


# -- in headless Chromium -------------------------------------------------------------------------


@dataclass
class Rendered:
    dom: El
    console: list[str]


def chromium(url: str, tmp_path: Path, *extra: str) -> Rendered:
    """Load ``url`` in headless Chromium; the DOM after the page's script ran, and every console
    message (Chromium logs each one to stderr as a ``CONSOLE`` line). ``extra``: more flags
    (a window size, a screenshot)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(
            "chromium is not installed, so the HTML report cannot be checked in a browser: "
            "run `apt-get install -y --no-install-recommends chromium` (Debian's package)"
        )
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    argv = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra, "--dump-dom",
        url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return Rendered(parse(done.stdout), console)


@pytest.mark.parametrize("name", ["mlp-O2", "mlp", "resnet", "tiny", "planted"])
def test_renders_in_headless_chromium_without_console_errors(
    name: str, pages: dict[str, Page], tmp_path: Path
) -> None:
    page = pages[name]
    shown = chromium(page.path.as_uri(), tmp_path)
    # the one console line is the page's own "rendered" marker: no error, no warning
    assert len(shown.console) == 1, shown.console
    assert f'"graphopt-report: rendered {len(page.entries)} entries"' in shown.console[0]
    (body,) = shown.dom.find_all("body")
    assert body.attrs.get("data-rendered") == "ok"
    errors = shown.dom.by_id("js-errors")
    assert "hidden" in errors.attrs and errors.all_text() == ""
    # the script copied the first changing pass's pictures into the two panes
    start = next(i for i, e in enumerate(page.entries) if e["before"] != e["after"])
    for pane, side in (("before-pane", "before"), ("after-pane", "after")):
        (picture,) = shown.dom.by_id(pane).find_all("svg")
        expected = page.svg(page.entries[start][side])
        assert picture.attrs["data-nodes"] == expected.attrs["data-nodes"] != "0"
        assert len(picture.find_all("g", "node")) == int(expected.attrs["data-nodes"])
    selected = [b for b in shown.dom.by_id("timeline").find_all("div", "bar")
                if "selected" in b.attrs["class"].split()]  # fmt: skip
    assert [b.attrs["data-record"] for b in selected] == [str(page.entries[start]["record"])]
    assert len(shown.dom.by_id("pass-select").find_all("option")) == len(page.entries)
    assert shown.dom.by_id("legend").find_all("span", "swatch")


def test_a_resnet_reads_on_one_screen(pages: dict[str, Page], tmp_path: Path) -> None:
    """The 54-node ResNet once drew as one column 356 x 3,946 px; now its columns are scaled to
    the pane of a 1600 x 1000 window and the whole graph fits on one screen."""
    page = pages["resnet"]
    size = ["--window-size=1600,1000", "--hide-scrollbars"]
    shown = chromium(page.path.as_uri(), tmp_path, *size)
    (body,) = shown.dom.find_all("body")
    width, height = map(int, body.attrs["data-graph-size"].split("x"))
    assert 300 < width <= 800 and 150 < height <= 1000, (width, height)
    (before,) = shown.dom.by_id("before-pane").find_all("svg")
    assert int(before.attrs["data-columns"]) >= 2
    # and a screenshot: Chromium draws the page (not a blank one) at that size
    shot = tmp_path / "resnet.png"
    subprocess.run(
        [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
         f"--user-data-dir={tmp_path / 'shot-profile'}", *size, f"--screenshot={shot}",
         page.path.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1600, 1000)
    assert len(data) > 20_000  # boxes, edges and text, not an empty page


def test_address_hash_opens_one_pass(pages: dict[str, Page], tmp_path: Path) -> None:
    page = pages["resnet"]
    k = next(i for i, e in enumerate(page.entries) if e["label"].startswith("fold-bn"))
    shown = chromium(f"{page.path.as_uri()}#entry-{k}", tmp_path)
    assert len(shown.console) == 1
    (before,) = shown.dom.by_id("before-pane").find_all("svg")
    assert len(before.find_all("g", "outline")) == 15  # every conv + batch norm pair of resnet
    assert before.attrs["data-nodes"] == page.svg(page.entries[k]["before"]).attrs["data-nodes"]


def test_near_miss_link_marks_the_node_in_the_graph_its_pass_saw(
    pages: dict[str, Page], tmp_path: Path
) -> None:
    page = pages["tiny"]
    shown = chromium(f"{page.path.as_uri()}#miss-0", tmp_path)
    assert len(shown.console) == 1
    (hit,) = [g for g in shown.dom.by_id("before-pane").find_all("g", "hit")]
    assert hit.attrs["data-node"] == "relu"
    epilogue = next(i for i, e in enumerate(page.entries) if e["label"].startswith("fuse-epi"))
    (picture,) = shown.dom.by_id("before-pane").find_all("svg")
    expected = page.svg(page.entries[epilogue]["before"])
    assert picture.find_all("title")[0].text == expected.find_all("title")[0].text


def test_chromium_check_sees_a_broken_script(pages: dict[str, Page], tmp_path: Path) -> None:
    # the checks above are only worth something if a script error shows: point the first
    # entry at a picture that does not exist, and the page must report it
    page = pages["mlp"]
    broken = tmp_path / "broken.html"
    key = page.entries[0]["before"]
    broken.write_text(page.text.replace(f'"before": "{key}"', '"before": "missing"', 1))
    shown = chromium(broken.as_uri(), tmp_path)
    (body,) = shown.dom.find_all("body")
    assert body.attrs.get("data-rendered") == "error"
    assert "script error" in shown.dom.by_id("js-errors").all_text()
    assert any("Uncaught TypeError" in line for line in shown.console)


def test_calib_file_calibrates_the_compile_the_page_shows(tmp_path: Path) -> None:
    """``--calib``: the page's run is graphopt.compile's with the same calibration data (int8
    and lower-int8 each have their row), and its command line names the file."""
    gen = torch.Generator().manual_seed(5)
    batches = [3 * torch.randn(16, 128, generator=gen) for _ in range(3)]
    torch.save(batches, tmp_path / "batches.pt")
    pipeline = "-O1,int8{measure=false}"
    model, inputs = load_model("mlp", None)
    run = report.collect(model, inputs, pipeline, calibration=batches)
    compiled = graphopt.compile(model, inputs, pipeline=pipeline, calibration_data=batches)
    names = [r.name for r in run.report.records]
    assert names == [r.name for r in compiled.report.records] and names[-2:] == [
        "int8",
        "lower-int8",
    ]
    assert run.report.records[-2].stats == compiled.report.records[-2].stats
    page = tmp_path / "page.html"
    argv = ["report", "mlp", "--pipeline", pipeline, "--calib", str(tmp_path / "batches.pt")]
    assert main([*argv, "-o", str(page), "--out", str(tmp_path / "run")]) == 0
    assert f"--calib {tmp_path / 'batches.pt'}" in page.read_text()
