"""Views: figures (:mod:`~sfp.viz.figures`), Jupyter widgets (:mod:`~sfp.viz.widgets`) and the
demo report (:mod:`~sfp.viz.demo`).
"""

from sfp._lazy import attach

__getattr__, __dir__ = attach(__name__, ("demo", "figures", "widgets"))
