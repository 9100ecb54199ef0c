"""Drawing a lineage tree (queries.show's `Node`): a rich Tree for the terminal, a PNG graph for
the pipeline run's artifacts (lineage/lineage.png).

The terminal tree prints each node's label and detail (URIs, digests, scores) through `scrub`;
the graph draws labels only. rich and matplotlib are imported on use, so importing lladav.lineage
stays cheap.
Owns: the look (colours per node kind, layout). Does not own: what the tree holds (queries.py)
or what was recorded (records.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lladav.lineage.queries import Node
from lladav.secrets import scrub


def render_tree(node: Node) -> Any:
    """A rich Tree of `node` for the terminal."""
    from rich.tree import Tree

    style = {"export": "bold", "mixture": "cyan", "source": "green", "init": "magenta",
             "eval": "yellow"}

    def add(tree: Any, n: Node) -> None:
        branch = tree.add(f"[{style.get(n.kind, '')}]{scrub(n.label)}[/]  [dim]{scrub(n.detail)}[/]")
        for c in n.children:
            add(branch, c)

    root = Tree(f"[bold]{scrub(node.label)}[/]  [dim]{scrub(node.detail)}[/]")
    for c in node.children:
        add(root, c)
    return root


def render_graph(node: Node, path: str | Path) -> Path:
    """The tree as a left-to-right graph image (PNG): sources -> mixtures -> exports.

    Drawn with matplotlib (an MLflow dependency) rather than graphviz, which needs a system binary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[int, Node, int | None]] = []  # (depth, node, parent row)

    def walk(n: Node, depth: int, parent: int | None) -> None:
        rows.append((depth, n, parent))
        me = len(rows) - 1
        for c in n.children:
            walk(c, depth + 1, me)

    walk(node, 0, None)
    depth_max = max(d for d, _, _ in rows)
    fig, ax = plt.subplots(figsize=(4 + 3.2 * depth_max, 0.5 + 0.45 * len(rows)))
    colours = {"export": "#f4d58d", "mixture": "#9ad1d4", "source": "#b8e0a8", "init": "#d7b9e8"}
    pos = {i: (d, -i) for i, (d, _, _) in enumerate(rows)}
    for i, (_, n, parent) in enumerate(rows):
        x, y = pos[i]
        if parent is not None:
            px, py = pos[parent]
            ax.annotate("", xy=(px + 0.05, py), xytext=(x - 0.05, y),
                        arrowprops={"arrowstyle": "->", "color": "#555"})
        ax.text(x, y, n.label, ha="left", va="center", fontsize=8,
                bbox={"boxstyle": "round", "fc": colours.get(n.kind, "#eee"), "ec": "#555"})
    ax.set_xlim(-0.2, depth_max + 1.5)
    ax.set_ylim(-len(rows), 1)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
