"""Load an open_clip CLIP model into a :class:`ModelBundle`.

``load_model`` accepts an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``,
...), a local weights file (OpenAI TorchScript archive, OpenAI-format or open_clip state
dict, ``.safetensors``), or ``None`` for random weights (tests only, asked for explicitly).

It never falls back to random weights: when a tag's weights are neither cached nor
downloadable it raises :class:`WeightsUnavailableError` with one sentence naming the way out
(``pretrained="/path/to/weights.pt"`` or the ``SFP_CHECKPOINT`` environment variable).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import socket
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from sfp.core.errors import SFPError
from sfp.models.bundle import (  # noqa: F401  (re-exported: their historical home)
    OPENAI_MEAN,
    OPENAI_STD,
    PROVENANCES,
    ModelBundle,
    ModelLoadError,
    bundle_from_model,
)

log = logging.getLogger(__name__)

#: Environment variable naming a local weights file; the CLI, demo and notebooks use it.
CHECKPOINT_ENV = "SFP_CHECKPOINT"
#: Seconds allowed for reaching the weights host before giving up.
DOWNLOAD_TIMEOUT_S = 25.0

#: Precision names and the dtype of the converted weights (see :func:`set_precision`).
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}
_PRECISIONS = PRECISIONS
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class WeightsUnavailableError(SFPError, RuntimeError):
    """Pretrained weights could not be found locally nor downloaded."""

    exit_code = 3


def _resolve_name(name: str) -> str:
    models = open_clip.list_models()
    cleaned = name.replace("/", "-")
    if cleaned in models:
        return cleaned
    close = difflib.get_close_matches(cleaned, models, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ModelLoadError(f"Unknown open_clip model {name!r}.{hint} See open_clip.list_models().")


def _check_vit_config(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    vcfg = cfg.get("vision_cfg", {})
    if "timm_model_name" in vcfg or isinstance(vcfg.get("layers"), (list, tuple)):
        raise ModelLoadError(
            f"{name} does not have an open_clip ViT visual tower; SFP is defined on ViT "
            "attention, so only ViT models (e.g. ViT-B-16, ViT-L-14) are supported."
        )
    return cfg


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a weights file -> (state dict, came from a TorchScript archive)."""
    if _is_torchscript_archive(path):
        try:
            archive = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # pragma: no cover - depends on corrupt files
            raise ModelLoadError(f"Could not read TorchScript archive {path}: {exc}") from exc
        sd = {k: v for k, v in archive.state_dict().items() if k not in _JIT_EXTRA_KEYS}
        return sd, True
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"Could not read weights file {path} ({type(exc).__name__}): expected a CLIP "
            "state dict (.pt/.bin/.safetensors) or an OpenAI TorchScript archive."
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ModelLoadError(f"Weights file {path} does not hold a state dict.")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    sd = {k: v for k, v in sd.items() if k not in _JIT_EXTRA_KEYS}
    return sd, False


def _architecture_of(sd: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """The ViT visual tower a CLIP state dict holds: width, depth (blocks), patch size,
    input size and output dim, read from the tensor shapes (None when not a CLIP ViT)."""
    conv = sd.get("visual.conv1.weight")
    pos = sd.get("visual.positional_embedding")
    if conv is None or conv.ndim != 4 or pos is None:
        return None
    blocks = {int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks.")}
    grid = math.isqrt(max(int(pos.shape[0]) - 1, 0))
    proj = sd.get("visual.proj")
    return {
        "width": int(conv.shape[0]),
        "layers": len(blocks),
        "patch_size": int(conv.shape[-1]),
        "image_size": grid * int(conv.shape[-1]),
        "embed_dim": int(proj.shape[1]) if proj is not None and proj.ndim == 2 else -1,
    }


def _matching_names(arch: dict[str, int]) -> list[str]:
    """open_clip model names whose visual tower has exactly the architecture ``arch``."""
    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        v = cfg.get("vision_cfg", {})
        if "timm_model_name" in v or not isinstance(v.get("layers"), int):
            continue
        size = v.get("image_size", 224)
        if (v.get("width"), v.get("layers"), v.get("patch_size"), size) != (
                arch["width"], arch["layers"], arch["patch_size"], arch["image_size"]):
            continue
        if arch["embed_dim"] > 0 and cfg.get("embed_dim") != arch["embed_dim"]:
            continue
        names.append(name)
    return sorted(names, key=lambda n: (len(n), n))


def _describe_file_architecture(sd: dict[str, torch.Tensor]) -> str:
    """' The file holds ...' sentence naming the detected architecture (or '' if unknown)."""
    arch = _architecture_of(sd)
    if arch is None:
        return ""
    names = _matching_names(arch)
    match = (f"; open_clip name: {' or '.join(names[:3])}" if names else
             "; no open_clip model has exactly this visual tower")
    return (f" The file holds a ViT visual tower of width {arch['width']}, {arch['layers']} "
            f"blocks, {arch['patch_size']} px patches, {arch['image_size']} px input, output "
            f"dim {arch['embed_dim']}{match}.")


def _load_state_dict_checked(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    # TorchScript archives also carry non-persistent buffers (e.g. the text attn_mask).
    buffers = {name for name, _ in model.named_buffers()}
    sd = {k: v for k, v in sd.items() if k in own or k not in buffers}
    mismatched = [
        (k, tuple(own[k].shape), tuple(v.shape))
        for k, v in sd.items()
        if k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    if "logit_scale" in sd and sd["logit_scale"].ndim != own["logit_scale"].ndim:
        sd = dict(sd, logit_scale=sd["logit_scale"].reshape(own["logit_scale"].shape))
        mismatched = [m for m in mismatched if m[0] != "logit_scale"]
    if mismatched:
        k, exp, found = mismatched[0]
        raise ModelLoadError(
            f"Weights in {source} do not fit this architecture: {k} expected shape {exp}, "
            f"found {found} ({len(mismatched)} mismatched tensors)."
            + (_describe_file_architecture(sd) or " Pick the model name that matches the file.")
        )
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ModelLoadError(
            f"Weights in {source} do not fit this architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
            + _describe_file_architecture(sd)
        )
    model.load_state_dict(sd, strict=True)


def _host_reachable(cfg: dict, timeout: float) -> bool:
    host = "huggingface.co" if cfg.get("hf_hub") else None
    if host is None and cfg.get("url"):
        host = cfg["url"].split("/")[2]
    if host is None:
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_pretrained(cfg: dict, cache_dir: str | None) -> str | None:
    """Path of a tag's weights when already in the Hugging Face cache, else None."""
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    repo, filename = os.path.split(hub)
    names = [filename] if filename else []
    names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for fname in names:
        hit = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _download_with_timeout(name: str, tag: str, cfg: dict, cache_dir: str | None) -> str:
    way_out = (
        f"pass a local file instead (load_model({name!r}, pretrained='/path/to/weights.pt') "
        f"or --pretrained PATH, or set {CHECKPOINT_ENV}=/path/to/weights.pt)."
    )
    cached = _cached_pretrained(cfg, cache_dir)
    if cached:
        return cached
    if not _host_reachable(cfg, timeout=min(10.0, DOWNLOAD_TIMEOUT_S)):
        raise WeightsUnavailableError(
            f"Could not download the {name} '{tag}' weights (no network and not in the "
            f"local cache); {way_out}"
        )
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["path"] = open_clip.pretrained.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(DOWNLOAD_TIMEOUT_S)
    path = result.get("path")
    if thread.is_alive() or not path or not os.path.isfile(path):
        why = "timed out" if thread.is_alive() else f"failed: {result.get('error', 'no file')}"
        raise WeightsUnavailableError(
            f"Could not download the {name} '{tag}' weights (download {why}); {way_out}"
        )
    return path


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class _Weights:
    """Where a model's weights come from and how to build the model for them."""

    label: str
    provenance: str
    state_dict: dict[str, torch.Tensor] | None
    quick_gelu: bool
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    path: str | None = None
    kind: str = ""

    def loaded_line(self, name: str) -> str:
        """One sentence for the terminal: what was loaded, from where, which activation."""
        act = "QuickGELU" if self.quick_gelu else "GELU (not QuickGELU)"
        what = f"{name} '{self.label}'" if self.provenance == "pretrained" else name
        return f"sfp: loaded {what} weights from {self.path} ({self.kind}; {act})."


class _DropRandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" warning:
    load_model builds every model without weights and loads them itself right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def _create_model(name: str, quick_gelu: bool) -> tuple[nn.Module, Any]:
    """open_clip's model and eval transform for ``name``, without weights and without its
    random-initialisation notice."""
    drop = _DropRandomInitNotice()
    loggers = [logging.getLogger(), logging.getLogger("open_clip")]
    for lg in loggers:
        lg.addFilter(drop)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, force_quick_gelu=quick_gelu
        )
    finally:
        for lg in loggers:
            lg.removeFilter(drop)
    return model, preprocess


def _file_weights(name: str, path: Path, quick_gelu: bool | None, cfg_qg: bool) -> _Weights:
    state_dict, is_jit = _read_weights_file(path)
    if quick_gelu is not None:
        qg = quick_gelu or cfg_qg
    elif is_jit or cfg_qg:
        qg = True
    else:
        qg = False
        log.warning(
            "%s: a plain state dict cannot say which activation it was trained with; "
            "using GELU (quick_gelu=False). OpenAI weights need quick_gelu=True "
            "(or the model name %s-quickgelu).",
            path.name,
            name,
        )
    kind = "OpenAI TorchScript archive" if is_jit else f"{path.suffix or 'weights'} state dict"
    return _Weights(str(path), "file", state_dict, qg, path=str(path.resolve()), kind=kind)


def _tag_weights(name: str, tag: str, quick_gelu: bool | None, cfg_qg: bool,
                 cache_dir: str | None) -> _Weights:
    tag_cfg = open_clip.pretrained.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        if os.sep in tag or tag.endswith((".pt", ".bin", ".safetensors")):
            raise ModelLoadError(f"Weights file not found: {tag}")
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelLoadError(
            f"{tag!r} is neither a file nor a pretrained tag of {name}; tags: {tags}."
        )
    qg = cfg_qg or (bool(tag_cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu)
    path = Path(_download_with_timeout(name, tag, tag_cfg, cache_dir))
    state_dict, _ = _read_weights_file(path)
    return _Weights(tag, "pretrained", state_dict, qg, tuple(tag_cfg.get("mean", OPENAI_MEAN)),
                    tuple(tag_cfg.get("std", OPENAI_STD)), path=str(path),
                    kind="open_clip pretrained tag")


def load_model(
    name: str = "ViT-B-16",
    pretrained: str | os.PathLike | None = "openai",
    device: str | torch.device | None = None,
    precision: str = "fp32",
    *,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    quiet: bool = False,
) -> ModelBundle:
    """Load an open_clip ViT CLIP model.

    Args:
        name: open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-B-16"``, or
            ``"toy"``: the toy CLIP shipped with sfp (:func:`sfp.models.toy.load_toy`; trained
            on generated textures, offline; ``pretrained`` is then ignored unless it is a
            weights file written by ``benchmarks/train_toy.py``).
        pretrained: a pretrained tag, a local weights file, or ``None`` for random weights.
        device: ``"cpu"``, ``"cuda"``...; None picks CUDA when available.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (:func:`set_precision`: low-precision
            weights with float32 LayerNorms, as the release runs fp16).
        quick_gelu: activation of the MLPs. None decides: True for the ``"openai"`` tag (and
            any tag trained with QuickGELU) and for OpenAI TorchScript archives; for a plain
            state-dict file the model config's default is used and a warning names it.
        cache_dir: download cache for tags (default: the Hugging Face cache).
        quiet: do not print the line saying what was loaded, from where, with which
            activation (stderr; printed for files and tags once the weights are in).

    Raises:
        WeightsUnavailableError: a tag's weights are not cached and cannot be downloaded.
        ModelLoadError: unknown model, non-ViT model, unreadable or mismatched weights.
    """
    if precision not in _PRECISIONS:
        raise ModelLoadError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}.")
    if name.lower() == "toy":
        from sfp.models.toy import load_toy

        path = None
        if pretrained is not None and os.path.isfile(os.fspath(pretrained)):
            path = pretrained
        elif pretrained is not None and str(pretrained) != "openai":
            raise ModelLoadError(f"The toy CLIP takes no pretrained tag, only a weights file "
                                 f"written by benchmarks/train_toy.py; {pretrained!s} is not a "
                                 "file.")
        bundle = load_toy(_resolve_device(device), path=path, quiet=quiet)
        set_precision(bundle.model, precision)
        return bundle
    name = _resolve_name(name)
    cfg = _check_vit_config(name)
    cfg_quick_gelu = bool(cfg.get("quick_gelu", False))
    if quick_gelu is False and cfg_quick_gelu:
        raise ModelLoadError(f"{name} is a QuickGELU model; quick_gelu=False contradicts it.")
    dev = _resolve_device(device)
    if pretrained is None:
        w = _Weights("random", "random", None, bool(quick_gelu) or cfg_quick_gelu)
        log.warning("%s: weights are RANDOM (pretrained=None); results mean nothing.", name)
    elif os.path.isfile(os.fspath(pretrained)):
        w = _file_weights(name, Path(os.fspath(pretrained)), quick_gelu, cfg_quick_gelu)
    else:
        w = _tag_weights(name, str(pretrained), quick_gelu, cfg_quick_gelu, cache_dir)
    label, state_dict, qg, mean, std = w.label, w.state_dict, w.quick_gelu, w.mean, w.std
    provenance = w.provenance

    model, preprocess = _create_model(name, qg)
    if state_dict is not None:
        _load_state_dict_checked(model, state_dict, label)
        if not quiet:
            print(w.loaded_line(name), file=sys.stderr)
    if (mean, std) != (OPENAI_MEAN, OPENAI_STD):
        preprocess = open_clip.image_transform(
            model.visual.image_size, is_train=False, mean=mean, std=std
        )
    model = set_precision(model.to(device=dev), precision).eval()
    return bundle_from_model(
        model, name=name, pretrained=label, preprocess=preprocess, quick_gelu=qg,
        mean=mean, std=std, provenance=provenance,
    )


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (input and weights), cast back to the input's dtype: the
    LayerNorm of OpenAI's CLIP code, which the SFP release runs in fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b,
                                        self.eps).to(x.dtype)


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """Put ``model`` (an open_clip CLIP, in place) in ``precision``; returns it.

    ``"fp32"``: every parameter float32. ``"fp16"`` / ``"bf16"``: the convention of OpenAI's
    ``clip.model.convert_weights``, which the SFP release runs on CUDA: the weights and biases
    of convolutions and linear layers, the attention's in-projection and the ``proj`` /
    ``text_projection`` matrices in the low-precision dtype; every LayerNorm keeps float32
    weights and computes in float32, casting its output back (:class:`Fp32LayerNorm`);
    class / positional embeddings stay float32 and are cast where they are added. Every
    activation between these ops (and so every SFP step's input and output) is then in the
    low-precision dtype.
    """
    if precision not in PRECISIONS:
        raise ModelLoadError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}.")
    if precision == "fp32":
        return model.float()
    dtype = PRECISIONS[precision]
    model.float()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.__class__ = Fp32LayerNorm
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
        if isinstance(m, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                         "in_proj_bias", "bias_k", "bias_v"):
                t = getattr(m, attr, None)
                if t is not None:
                    t.data = t.data.to(dtype)
        for attr in ("proj", "text_projection"):
            t = getattr(m, attr, None)
            if isinstance(t, torch.Tensor):
                t.data = t.data.to(dtype)
    return model


def precision_of(model: nn.Module) -> str:
    """The name of ``model``'s precision (from its patch-embedding weights; another dtype,
    e.g. float64, by its torch name)."""
    dtype = model.visual.conv1.weight.dtype
    return next((k for k, v in PRECISIONS.items() if v == dtype),
                str(dtype).replace("torch.", ""))


def default_precision(device: str | torch.device) -> str:
    """The evaluation default: ``"fp16"`` on CUDA (as the release runs), else ``"fp32"``."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def default_pretrained() -> str:
    """The weights the CLI/demo use by default: ``$SFP_CHECKPOINT`` if set, else ``"openai"``."""
    return os.environ.get(CHECKPOINT_ENV) or "openai"
