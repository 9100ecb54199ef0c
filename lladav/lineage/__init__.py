"""Lineage in MLflow: what the pipeline records, and the two questions auditors ask of it.

    pipeline run (parent)                      tags lladav.pipeline, lladav.git_commit, lladav.version
    ├── step run "mix-stage1"  (kind data)     inputs: each source corpus (context "source")
    │                                          tags lladav.mixture + lladav.mixture_digest
    ├── step run "mix-view"    (kind view)     inputs: each mixture it weights (context "mixture")
    │                                          tags lladav.mixture + lladav.mixture_digest (the view's)
    ├── step run "stage1"      (kind stage)    inputs: its mixture (context "train", digest tag),
    │                                          and if that is a view, the view's mixtures
    │                                          (context "mixture", tag lladav.view)
    │                                          tags lladav.export, lladav.parent_run (the stage
    │                                          whose export it started from), metrics per step
    └── step run "eval"        (kind eval)     metrics accuracy, class_accuracy/<answer>; the
                                               samples, confusion.csv and by_class.json

Three modules, records then views:
    records.py   writing it: `Lineage` (the driver's MLflow writer), `StepMetrics` (a stage
                 worker's step hook), the tracking URI, `TrackingError`; every value scrubbed
    queries.py   reading it back: `show` (an export's tree of `Node`s), `trace` (the exports that
                 read a record), and the takedown's `mixtures_holding` / `stages_after`
    render.py    drawing a tree: `render_tree` (terminal), `render_graph` (PNG)
The OpenLineage events of the same step runs are lladav/openlineage.py's.

Owns: the MLflow vocabulary above and the show/trace queries. Does not own: when steps run
(pipeline.py) or what a mixture/export holds (data/manifest.py, train/).
"""

from lladav.lineage.queries import (LineageError, Node, TraceHit, mixture_holding, mixtures_holding,
                                    show, stages_after, stages_in, trace)
from lladav.lineage.records import (PREFIX, Lineage, StepMetrics, TrackingError, default_tracking_uri,
                                    flatten)
from lladav.lineage.render import render_graph, render_tree
from lladav.secrets import scrub

__all__ = ["PREFIX", "Lineage", "LineageError", "Node", "StepMetrics", "TraceHit", "TrackingError",
           "default_tracking_uri", "flatten", "mixture_holding", "mixtures_holding", "render_graph",
           "render_tree", "scrub", "show", "stages_after", "stages_in", "trace"]
