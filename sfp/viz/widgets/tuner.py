"""``ThresholdTuner``: tune SFP's thresholds on your own images, with live mIoU.

>>> tuner = ThresholdTuner(bundle, {"coffee": data.coffee()}, "cup; table; background")
>>> tuner                                  # display; move the sliders
>>> print(tuner.config_code())            # or press "copy config"

Two kinds of controls:

- **encoder-level** (``detector_dropdown``, ``top_k_slider``, ``cls_scale_slider``,
  ``sim_threshold_slider``, ``res_cls_slider``): they change the
  :class:`sfp.methods.config.SFPConfig`, so the images are encoded again
  (:meth:`sfp.seg.pipeline.Segmenter.predict_logits`). The window-averaged logits of every
  configuration seen are cached (``cache_size`` configs), so returning to an earlier setting
  is instant.
- **post-processing** (``logit_scale_slider``, ``prob_thd_slider``, ``area_thd_slider``): they
  only re-run :meth:`sfp.seg.pipeline.Segmenter.postprocess` on the cached logits — the encoder is
  not called.

``top_k = 0`` means "no limit" (``top_k=None``, SOM only); ``area_thd = 0`` means "off"
(``area_thd=None``). With ``couple_checkbox`` ticked, moving ``res_cls`` also sets
``cls_scale = 5 x res_cls``, as the release couples them. With ``masks`` the mIoU over all
images (:class:`sfp.seg.metrics.ConfusionAccumulator`, label 255 ignored) is shown live, with
per-class IoU in the legend. ``encoder_runs`` counts encoder passes and ``last_update`` says
what the last change cost.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from sfp.core.io import load_image
from sfp.core.outliers import DETECTORS, available_detectors
from sfp.methods.config import ConfigError, SFPConfig
from sfp.seg.benchmarks import Settings
from sfp.seg.metrics import ConfusionAccumulator, SegMetrics
from sfp.seg.pipeline import Segmentation, SegmentationScores, Segmenter
from sfp.viz.widgets._common import (
    SLIDER_KW,
    SFPWidget,
    describe_source,
    fixed_image_axes,
    html_escape,
    label_colors,
    labels_uri,
    param_slider,
    static_copy,
    stopwatch,
    torch_threads,
    widget_settings,
)
from sfp.viz.widgets.stages import legend_html

__all__ = ["ThresholdTuner"]

ENCODER_CONTROLS = ("detector_dropdown", "top_k_slider", "cls_scale_slider",
                    "sim_threshold_slider", "res_cls_slider")
POST_CONTROLS = ("logit_scale_slider", "prob_thd_slider", "area_thd_slider")


def _as_items(images: Any) -> tuple[list[str], list[Any]]:
    if isinstance(images, Mapping):
        return [str(k) for k in images], list(images.values())
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        images = [images]
    return [f"image {i}" for i in range(len(images))], list(images)


class ThresholdTuner(SFPWidget):
    """Sliders for SFP's thresholds, segmentations of your images, and mIoU when masks exist.

    Args:
        bundle: the model.
        images: one image, a list, or ``{name: image}`` (paths, PIL, arrays, tensors).
        classes: anything :class:`sfp.seg.pipeline.Segmenter` takes.
        masks: optional ground-truth label maps ``(H, W)`` (class indices, 255 = ignore), one
            per image at the image's own resolution (a list, or a dict with the same keys).
        config: the SFP configuration to start from (default ``SFPConfig.official()``).
        templates: prompt templates (default ``"simple"``: one per name; None = 80 OpenAI).
        settings: segmentation settings (default :data:`~sfp.viz.widgets._common.WIDGET_SETTINGS`:
            the released protocol with a 224 px short side, one crop for a square image);
            its logit_scale, prob_thd and area_thd are the sliders' initial values.
        cache_size: configurations whose logits are kept.
        panel_size: width of one image panel in screen pixels.
        **overrides: single settings fields (``short_side=336``, ``logit_scale=50``, ...).
    """

    def __init__(
        self,
        bundle: Any,
        images: Any,
        classes: Any,
        masks: Any = None,
        *,
        config: SFPConfig | None = None,
        templates: Any = "simple",
        settings: Settings | None = None,
        cache_size: int = 16,
        panel_size: int = 240,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.bundle = bundle
        self.classes = classes
        self.base_config = SFPConfig.official() if config is None else config
        self.names, sources = _as_items(images)
        self.images = [load_image(s) for s in sources]
        self.images_rgb = [
            (im.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8) for im in self.images
        ]
        self.masks = self._check_masks(masks)
        self.settings = widget_settings(settings, overrides, bundle)
        st = self.settings
        self.seg_kwargs: dict[str, Any] = dict(templates=templates, short_side=st.short_side,
                                               crop=st.crop, stride=st.stride,
                                               max_long_side=st.max_long_side)
        self.cache_size = int(cache_size)
        self.panel_size = int(panel_size)
        self._cache: OrderedDict[SFPConfig, list[SegmentationScores]] = OrderedDict()
        self._segmenters: dict[SFPConfig, Segmenter] = {}
        self.encoder_runs = 0
        self.last_update: dict[str, Any] = {}
        self.segmentations: list[Segmentation] = []
        self.metrics: SegMetrics | None = None
        self.image_metrics: list[SegMetrics] = []
        self._busy = False
        self._gt_drawn = False
        self._gt_present: set[int] = set()
        if self.masks is not None:
            for m in self.masks:
                self._gt_present.update(int(v) for v in np.unique(m) if v != 255)

        self._make_sliders()
        self.copy_button = widgets.Button(description="copy config", icon="copy",
                                          tooltip="show the SFPConfig / Segmenter call")
        self.code_text = widgets.Textarea(
            value="", description="", placeholder="press 'copy config'",
            layout=widgets.Layout(width="100%", height="8em", display="none"))
        self.status = widgets.HTML()
        self.legend = widgets.HTML()

        self.figure = go.FigureWidget(self._build_figure())
        self._panels = {t.meta: t for t in self.figure.data}

        for name in ENCODER_CONTROLS:
            getattr(self, name).observe(self._on_encoder_change, names="value")
        for name in POST_CONTROLS:
            getattr(self, name).observe(self._on_post_change, names="value")
        self.copy_button.on_click(lambda _b: self.print_config())

        self.children = self._layout()
        self.add_class("sfp-threshold-tuner")
        self.update(encoder=True)

    def _make_sliders(self) -> None:
        """The encoder- and post-processing-level controls, ranges from the registries."""
        cfg, st = self.base_config, self.settings
        som = DETECTORS.get("som")
        self.detector_dropdown = widgets.Dropdown(options=available_detectors(),
                                                  value=cfg.detector, description="detector")
        self.top_k_slider = param_slider(som.param("top_k"), 0 if cfg.top_k is None else cfg.top_k,
                                         "top_k (0 = no limit)", low=0)
        self.cls_scale_slider = param_slider(som.param("cls_scale"), cfg.cls_scale)
        self.sim_threshold_slider = widgets.FloatSlider(value=cfg.sim_threshold, min=0.0,
                                                        max=1.0, step=0.02,
                                                        description="sim_threshold", **SLIDER_KW)
        self.res_cls_slider = widgets.FloatSlider(value=cfg.res_cls, min=0.0, max=1.0, step=0.02,
                                                  description="res_cls (λ)", **SLIDER_KW)
        self.couple_checkbox = widgets.Checkbox(value=False, indent=False,
                                                description="couple cls_scale = 5 × res_cls",
                                                layout=widgets.Layout(width="auto"))
        self.logit_scale_slider = widgets.FloatSlider(value=st.logit_scale, min=1.0, max=100.0,
                                                      step=1.0, description="logit_scale",
                                                      **SLIDER_KW)
        self.prob_thd_slider = widgets.FloatSlider(value=st.prob_thd, min=0.0, max=1.0,
                                                   step=0.01, description="prob_thd", **SLIDER_KW)
        self.area_thd_slider = widgets.FloatSlider(value=st.area_thd or 0.0, min=0.0, max=0.5,
                                                   step=0.01, description="area_thd (0 = off)",
                                                   **SLIDER_KW)

    def _layout(self) -> list[widgets.Widget]:
        title = widgets.HTML(f"<b>{html_escape(describe_source(self.bundle))}</b> — SFP "
                             "threshold tuner")
        enc_box = widgets.VBox([widgets.HTML("<b>encoder</b> (re-encodes)"),
                                self.detector_dropdown, self.top_k_slider,
                                self.cls_scale_slider, self.sim_threshold_slider,
                                self.res_cls_slider, self.couple_checkbox])
        post_box = widgets.VBox([widgets.HTML("<b>post-processing</b> (cached logits)"),
                                 self.logit_scale_slider, self.prob_thd_slider,
                                 self.area_thd_slider, self.copy_button])
        return [title, widgets.HBox([enc_box, post_box]), self.figure, self.legend,
                self.status, self.code_text]

    # ------------------------------------------------------------------ settings
    def _check_masks(self, masks: Any) -> list[np.ndarray] | None:
        if masks is None:
            return None
        if isinstance(masks, Mapping):
            missing = [n for n in self.names if n not in masks]
            if missing:
                raise ValueError(f"masks has no entry for images {missing}")
            masks = [masks[n] for n in self.names]
        masks = list(masks) if not isinstance(masks, (np.ndarray, torch.Tensor)) else [masks]
        if len(masks) != len(self.images):
            raise ValueError(f"got {len(masks)} masks for {len(self.images)} images")
        out = []
        for name, m, im in zip(self.names, masks, self.images, strict=True):
            arr = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
            if arr.shape != tuple(im.shape[-2:]):
                raise ValueError(f"mask of {name} is {arr.shape}, image is "
                                 f"{tuple(im.shape[-2:])}; masks must match the images")
            out.append(arr.astype(np.int64))
        return out

    def current_config(self) -> SFPConfig:
        """The SFPConfig the encoder-level controls describe (ConfigError if invalid)."""
        top_k = int(self.top_k_slider.value)
        return self.base_config.replace(
            detector=self.detector_dropdown.value,
            top_k=None if top_k == 0 else top_k,
            cls_scale=_on_step(self.cls_scale_slider),
            sim_threshold=_on_step(self.sim_threshold_slider),
            res_cls=_on_step(self.res_cls_slider),
        )

    def post_params(self) -> dict[str, Any]:
        """``logit_scale``, ``prob_thd``, ``area_thd`` (None when 0) from the sliders."""
        area = _on_step(self.area_thd_slider)
        return {"logit_scale": _on_step(self.logit_scale_slider),
                "prob_thd": _on_step(self.prob_thd_slider),
                "area_thd": None if area == 0 else area}

    @property
    def segmenter(self) -> Segmenter:
        """The Segmenter of the current configuration."""
        return self._segmenter_for(self.current_config())

    def _segmenter_for(self, cfg: SFPConfig) -> Segmenter:
        if cfg not in self._segmenters:
            self._segmenters[cfg] = Segmenter(self.bundle, self.classes, method="sfp",
                                              config=cfg, **self.seg_kwargs)
        return self._segmenters[cfg]

    @property
    def miou(self) -> float | None:
        """mIoU (fraction) over all images, or None without masks."""
        return None if self.metrics is None else float(self.metrics.miou)

    # ------------------------------------------------------------------ computing
    def scores(self, cfg: SFPConfig | None = None) -> list[SegmentationScores]:
        """Window-averaged logits of every image under ``cfg`` (cached; encodes on a miss)."""
        cfg = self.current_config() if cfg is None else cfg
        if cfg in self._cache:
            self._cache.move_to_end(cfg)
            return self._cache[cfg]
        seg = self._segmenter_for(cfg)
        out = [seg.predict_logits(im) for im in self.images]
        self.encoder_runs += len(out)
        self._cache[cfg] = out
        while len(self._cache) > self.cache_size:
            old, _ = self._cache.popitem(last=False)
            self._segmenters.pop(old, None)
        return out

    def update(self, encoder: bool = False) -> None:
        """Recompute segmentations (and the encoder's logits when ``encoder`` and not cached),
        metrics and the figure from the controls."""
        kind = "encoder" if encoder else "post-processing"
        runs_before = self.encoder_runs
        with stopwatch() as t:
            try:
                cfg = self.current_config()
            except ConfigError as exc:
                self.status.value = f"<span style='color:#b00'>{html_escape(str(exc))}</span>"
                return
            cached = self.scores(cfg)
            seg = self._segmenter_for(cfg)
            post = self.post_params()
            with torch_threads(1):  # small tensors: one thread is faster (see torch_threads)
                self.segmentations = [seg.postprocess(sc, **post) for sc in cached]
            self._compute_metrics()
            self._draw()
        self.last_update = {"kind": kind, "seconds": t[0],
                            "encoder_runs": self.encoder_runs - runs_before}
        self._status()

    def _compute_metrics(self) -> None:
        if self.masks is None:
            self.metrics, self.image_metrics = None, []
            return
        c = self.segmentations[0].num_classes
        names = self.segmentations[0].class_names
        total = ConfusionAccumulator(c, ignore_index=255)
        self.image_metrics = []
        for seg, mask in zip(self.segmentations, self.masks, strict=True):
            one = ConfusionAccumulator(c, ignore_index=255).update(seg.labels.numpy(), mask)
            self.image_metrics.append(one.summary(names))
            total.merge(one)
        self.metrics = total.summary(names)

    # ------------------------------------------------------------------ drawing
    def _build_figure(self) -> go.Figure:
        n = len(self.images)
        rows = 2 if self.masks is not None else 1
        titles = list(self.names) + ([f"{nm}: ground truth" for nm in self.names]
                                     if rows == 2 else [])
        fig = make_subplots(rows=rows, cols=n, subplot_titles=titles, horizontal_spacing=0.01,
                            vertical_spacing=0.06)
        k = 0
        for r in range(1, rows + 1):
            for i in range(n):
                k += 1
                kind = "pred" if r == 1 else "gt"
                fig.add_trace(go.Image(source="", meta=f"{kind}:{i}", name=self.names[i],
                                       hoverinfo="skip"), row=r, col=i + 1)
                h, w = self.images_rgb[i].shape[:2]
                fixed_image_axes(fig, k, h, w)
        h0, w0 = self.images_rgb[0].shape[:2]
        fig.update_layout(width=max(480, self.panel_size * n + 40),
                          height=rows * int(self.panel_size * h0 / w0) + 90,
                          margin={"l": 10, "r": 10, "t": 80, "b": 10}, dragmode=False,
                          title={"text": describe_source(self.bundle), "font": {"size": 13}})
        return fig

    def _draw(self) -> None:
        c = self.segmentations[0].num_classes
        colors = label_colors(c, self.segmentations[0].class_names)
        present: set[int] = set(self._gt_present)
        with self.figure.batch_update():
            for i, seg in enumerate(self.segmentations):
                labels = seg.labels.numpy()
                present.update(int(v) for v in np.unique(labels))
                self._panels[f"pred:{i}"].source = labels_uri(labels, colors,
                                                              self.images_rgb[i])
                title = self.names[i]
                if self.image_metrics:
                    title += f" — mIoU {100 * self.image_metrics[i].miou:.1f}"
                self.figure.layout.annotations[i].text = title
                if self.masks is not None and not self._gt_drawn:
                    self._panels[f"gt:{i}"].source = labels_uri(self.masks[i], colors,
                                                                self.images_rgb[i])
            self._gt_drawn = self.masks is not None
            if self.metrics is not None:
                self.figure.layout.title.text = (
                    f"{describe_source(self.bundle)}<br>mIoU {100 * self.metrics.miou:.2f} "
                    f"over {len(self.images)} image(s)"
                )
        names = self.segmentations[0].class_names
        extra = None
        if self.metrics is not None:
            extra = {ci: f"(IoU {100 * v:.1f})" for ci, v in enumerate(self.metrics.iou)
                     if np.isfinite(v)}
        self.legend.value = legend_html(names, colors, sorted(present), extra)

    def _status(self) -> None:
        lu = self.last_update
        ms = 1000 * lu.get("seconds", 0.0)
        runs = lu.get("encoder_runs", 0)
        enc = f"{runs} encoder run(s)" if runs else "no encoder run (cached logits)"
        miou = "" if self.metrics is None else f" · mIoU {100 * self.metrics.miou:.2f}"
        self.status.value = (
            f"last change: {lu.get('kind', '')}, {ms:.0f} ms, {enc}{miou} · "
            f"<code>{html_escape(self.current_config().to_code())}</code>"
        )

    # ------------------------------------------------------------------ events
    #: keyword of :meth:`set` -> control attribute
    CONTROL_NAMES = {
        "detector": "detector_dropdown", "top_k": "top_k_slider",
        "cls_scale": "cls_scale_slider", "sim_threshold": "sim_threshold_slider",
        "res_cls": "res_cls_slider", "logit_scale": "logit_scale_slider",
        "prob_thd": "prob_thd_slider", "area_thd": "area_thd_slider",
    }

    def set(self, **values: Any) -> None:
        """Set several controls at once with a single update, e.g.
        ``tuner.set(top_k=5, sim_threshold=0.5, logit_scale=50)`` (``top_k=None`` and
        ``area_thd=None`` mean 0 on their sliders). Unknown names raise ValueError."""
        unknown = sorted(set(values) - set(self.CONTROL_NAMES))
        if unknown:
            raise ValueError(f"unknown controls {unknown}; use {sorted(self.CONTROL_NAMES)}")
        encoder = any(k in values for k in ("detector", "top_k", "cls_scale", "sim_threshold",
                                            "res_cls"))
        self._busy = True
        try:
            for key, value in values.items():
                if key in ("top_k", "area_thd") and value is None:
                    value = 0
                getattr(self, self.CONTROL_NAMES[key]).value = value
        finally:
            self._busy = False
        self.update(encoder=encoder)

    def _on_encoder_change(self, change: dict[str, Any]) -> None:
        if self._busy:
            return
        if change["owner"] is self.res_cls_slider and self.couple_checkbox.value:
            self._busy = True
            try:
                self.cls_scale_slider.value = min(
                    self.cls_scale_slider.max, max(self.cls_scale_slider.min,
                                                   5.0 * float(change["new"]))
                )
            finally:
                self._busy = False
        self.update(encoder=True)

    def _on_post_change(self, change: dict[str, Any]) -> None:
        if not self._busy:
            self.update(encoder=False)

    # ------------------------------------------------------------------ code
    def config_code(self) -> str:
        """Python that rebuilds the current settings: an SFPConfig and a Segmenter call."""
        cfg = self.current_config()
        post = self.post_params()
        classes = repr(self.classes) if isinstance(self.classes, str) or len(
            repr(self.classes)) <= 200 else "classes"
        kw = self.seg_kwargs
        args = ["method='sfp'", "config=config"]
        args += [f"{k}={kw[k]!r}" for k in ("short_side", "crop", "stride", "max_long_side",
                                            "templates")]
        args += [f"{k}={v!r}" for k, v in post.items()]
        return (
            "from sfp.methods.config import SFPConfig\n"
            "from sfp.seg.pipeline import Segmenter\n\n"
            f"config = {cfg.to_code()}\n"
            f"segmenter = Segmenter(bundle, {classes}, " + ", ".join(args) + ")"
        )

    def print_config(self) -> str:
        """Put :meth:`config_code` into the widget's text field, ready to copy (the copy
        button); returns it."""
        code = self.config_code()
        self.code_text.value = code
        self.code_text.layout.display = ""
        return code

    # ------------------------------------------------------------------ export
    def figure_widgets(self) -> list[go.FigureWidget]:
        return [self.figure]

    def to_figure(self) -> go.Figure:
        """The current segmentations as a static ``go.Figure``."""
        return static_copy(self.figure)


def _on_step(slider: Any) -> float:
    """A float slider's value rounded to the decimals of its step (sliders produce values
    such as 41.00000000000001)."""
    step = float(getattr(slider, "step", 0) or 0)
    decimals = max(0, -int(math.floor(math.log10(step)))) + 1 if 0 < step < 1 else 2
    return round(float(slider.value), decimals)
