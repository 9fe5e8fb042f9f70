"""Models: loading CLIP weights, text queries, the planted-outlier model.

- :mod:`~sfp.models.loading` — ``load_model``, ``ModelBundle``, weight provenance;
- :mod:`~sfp.models.text` — class lists, template sets, query embeddings;
- :mod:`~sfp.models.synthetic` — ``planted_model`` with ground truth.
"""

from sfp._lazy import attach

__getattr__, __dir__ = attach(__name__, ("loading", "synthetic", "text"))
