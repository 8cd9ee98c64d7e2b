"""Plotting functions: pure functions that take numbers and return `plotly.graph_objects.Figure` (chapter 1).

One submodule per chapter's figures; none imports a chapter module (they only draw what they are given), so
`dslib.viz` stays a chapter-1 module. Widget cells in the notebooks only wire sliders to these functions.
"""
from dslib.viz.common import *  # noqa: F401,F403
from dslib.viz.diagrams import *  # noqa: F401,F403
from dslib.viz.gpu import *  # noqa: F401,F403
from dslib.viz.kv import *  # noqa: F401,F403
from dslib.viz.mla import *  # noqa: F401,F403
from dslib.viz.model import *  # noqa: F401,F403
from dslib.viz.moe import *  # noqa: F401,F403
from dslib.viz.sparse import *  # noqa: F401,F403
from dslib.viz.text import *  # noqa: F401,F403
