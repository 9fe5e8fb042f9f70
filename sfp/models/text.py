"""Class names, prompt templates and text query embeddings.

A class is a list of synonyms. Class files hold one class per line with synonyms separated
by ", " (the benchmark lists shipped in ``sfp/data``; voc21's first line is a background
class with many stuff names). Every name becomes one text query: it is embedded with each
prompt template, each embedding L2-normalised, averaged, and normalised again.

Query embeddings are cached in memory per model and on disk (:func:`text_cache_dir`), keyed
by a fingerprint of the text tower's weights (:func:`text_fingerprint`), the template texts
and the name, so a second run with the same model and classes does not run the text
encoder. ``$SFP_TEXT_CACHE`` moves the disk cache (a directory) or switches it off
(``off``); ``cache=False`` (``--no-cache``) skips it for one call.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from sfp.core.errors import SFPError
from sfp.core.registry import Registry

Template = Callable[[str], str]
ClassSpec = str | Path | Sequence[str | Sequence[str]]

#: The 80 prompt templates OpenAI used for ImageNet zero-shot, as open_clip ships them.
OPENAI_TEMPLATES: tuple[Template, ...] = tuple(open_clip.OPENAI_IMAGENET_TEMPLATES)

#: Named prompt-template sets (value: a tuple of templates).
TEMPLATES: Registry[tuple[Template | str, ...]] = Registry("template set")
TEMPLATES.register("openai80", OPENAI_TEMPLATES, display="80 OpenAI ImageNet templates",
                   doc="the 80 templates OpenAI used for ImageNet zero-shot (the papers' choice)")
#: The 15 templates of the release's December 2025 code (its run log's text queries).
SFP15_TEMPLATES: tuple[str, ...] = (
    "a clean origami {}.",
    "a photo of a {}.",
    "This is a photo of a {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a {} in the scene.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
    "There is the {} in the scene.",
    "a photo of a {} in the scene.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
)
TEMPLATES.register("sfp15", SFP15_TEMPLATES, display="15 SFP templates",
                   doc="the 15 templates of the release's December 2025 code (its VOC21 run "
                       "log; the default of preset release-2025-12)")
TEMPLATES.register("simple", ("a photo of a {}.",), display="'a photo of a {}.'",
                   doc="one template, 'a photo of a {}.': fast, for quick looks and tests")
TEMPLATES.register("toy", ("a photo of {}.",), display="'a photo of {}.'",
                   doc="the toy CLIP's template, 'a photo of {}.' (words of its captions)")

TemplateSpec = str | Sequence[Template | str] | None
"""A template set name, a list of format strings with ``{}`` / callables, or None (openai80)."""


def resolve_templates(templates: TemplateSpec) -> tuple[Template | str, ...]:
    """The templates a :data:`TemplateSpec` names (None: the 80 OpenAI templates)."""
    if templates is None:
        return OPENAI_TEMPLATES
    if isinstance(templates, str):
        return TEMPLATES.get(templates).value
    out = tuple(templates)
    if not out:
        raise ClassListError("templates is empty; pass None for the 80 OpenAI templates.")
    return out


def templates_key(templates: TemplateSpec) -> str | list[str]:
    """JSON-friendly description of a template choice: its set name, or the template texts."""
    if templates is None:
        return "openai80"
    if isinstance(templates, str):
        return TEMPLATES.get(templates).name
    return [t("{}") if callable(t) else str(t) for t in templates]

class ClassListError(SFPError, ValueError):
    """A class list is empty, has empty names, or repeats a name."""


def _split_names(line: str, where: str) -> list[str]:
    names = [n.strip() for n in line.split(",")]
    if any(not n for n in names):
        raise ClassListError(f"{where}: empty name in {line!r} (synonyms are separated by ', ').")
    return names


def read_class_file(path: str | Path, allow_duplicates: bool = False) -> list[list[str]]:
    """One class per non-empty line, synonyms separated by ", " -> list of synonym lists.

    ``allow_duplicates`` accepts a name listed under two classes (the released COCO-Object
    list has "bed" both in the background line and as a class); otherwise that is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No class file at {path}.")
    lines = path.read_text(encoding="utf-8").splitlines()
    classes = [
        _split_names(line, f"{path}:{i}") for i, line in enumerate(lines, 1) if line.strip()
    ]
    return validate_classes(classes, where=str(path), allow_duplicates=allow_duplicates)


def validate_classes(
    classes: Sequence[Sequence[str]], where: str = "classes", allow_duplicates: bool = False
) -> list[list[str]]:
    """Check a list of synonym lists: non-empty, no empty names, no name used twice."""
    if len(classes) == 0:
        raise ClassListError(f"{where}: the class list is empty.")
    seen: dict[str, int] = {}
    out = []
    for ci, syns in enumerate(classes):
        syns = [s.strip() for s in syns]
        if not syns or any(not s for s in syns):
            raise ClassListError(f"{where}: class {ci} has an empty name ({list(syns)!r}).")
        for s in syns:
            if s in seen and not (allow_duplicates and seen[s] != ci):
                other = seen[s]
                raise ClassListError(
                    f"{where}: the name {s!r} appears in class {other} and class {ci}; "
                    "each name must belong to one class."
                    if other != ci
                    else f"{where}: the name {s!r} appears twice in class {ci}."
                )
            seen[s] = ci
        out.append(syns)
    return out


def parse_classes(classes: ClassSpec, allow_duplicates: bool = False) -> list[list[str]]:
    """Normalise any accepted class specification to a list of synonym lists.

    Accepts: a class-file path, a ``"cat; dog; grass"`` string, a list of names (each may
    hold ", "-separated synonyms) or a list of lists. (Benchmark names such as ``"voc21"``
    are resolved one layer up, by :func:`sfp.seg.benchmarks.class_list`.)
    """
    if isinstance(classes, Path) or (isinstance(classes, str) and Path(classes).is_file()):
        return read_class_file(classes)
    if isinstance(classes, str):
        items = [c for c in classes.split(";") if c.strip()]
        return validate_classes([_split_names(c, "classes") for c in items])
    if not isinstance(classes, Sequence):
        raise ClassListError(
            f"classes must be a list of names, a list of synonym lists, a class file or a "
            f"benchmark name; got {type(classes).__name__}."
        )
    out: list[list[str]] = []
    for item in classes:
        if isinstance(item, str):
            out.append(_split_names(item, "classes"))
        elif isinstance(item, Sequence) and all(isinstance(s, str) for s in item):
            out.append(list(item))
        else:
            raise ClassListError(f"each class must be a name or a list of names, got {item!r}.")
    return validate_classes(out, allow_duplicates=allow_duplicates)


@dataclass(frozen=True)
class Queries:
    """Text queries: one L2-normalised embedding per name.

    embeddings: (Q, D); query_to_class: (Q,) long, class index of each query;
    class_names: first name of each class; names: every query's name.
    """

    embeddings: torch.Tensor
    query_to_class: torch.Tensor
    class_names: list[str]
    names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` trimmed to the longest prompt: (Q, 77) -> (Q, D).

    The text transformer is causal and pools at the end-of-text token, so positions after
    the longest prompt's EOT cannot change the result; dropping them saves most of the work.
    """
    pool_type = getattr(model, "text_pool_type", None)
    mask = getattr(model, "attn_mask", None)
    if not isinstance(model, open_clip.CLIP) or pool_type not in ("argmax", "first") or (
        mask is None
    ):
        return model.encode_text(tokens)
    n = int(tokens.argmax(dim=-1).max()) + 1
    t = tokens[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.transformer(x, attn_mask=mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, t, pool_type)
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: Environment variable: the text-query cache directory, or ``off`` to disable it.
TEXT_CACHE_ENV = "SFP_TEXT_CACHE"


def text_cache_dir() -> Path | None:
    """Where query embeddings are cached: ``$SFP_TEXT_CACHE`` if set (``off``, ``0`` or an
    empty value: no disk cache), else ``$XDG_CACHE_HOME/sfp/text`` (default
    ``~/.cache/sfp/text``)."""
    env = os.environ.get(TEXT_CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "no", "false") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sfp" / "text"


def text_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of everything of ``model`` outside ``visual`` (the text tower: names,
    dtypes, shapes and bytes of its parameters and buffers) and of its activation type.

    Memoised per model and dtype of the text weights; a model whose weights are changed in
    place afterwards keeps its old fingerprint.
    """
    items = [(k, v) for k, v in model.state_dict().items() if not k.startswith("visual.")]
    dtypes = tuple(str(v.dtype) for _, v in items)
    memo = _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == dtypes:
        return memo[1]
    h = hashlib.sha256()
    acts = sorted({type(m).__name__ for m in model.modules() if "GELU" in type(m).__name__})
    h.update(repr(acts).encode())
    for k, v in items:
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        t = v.detach().cpu().contiguous().reshape(-1)
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    out = h.hexdigest()
    _FINGERPRINTS[model] = (dtypes, out)
    return out


def _cache_file(model: torch.nn.Module, tkey: tuple[str, ...], root: Path) -> Path:
    tkey_hash = hashlib.sha256("\n".join(tkey).encode()).hexdigest()[:24]
    return root / text_fingerprint(model)[:32] / f"{tkey_hash}.pt"


def _read_cache(path: Path) -> dict[str, torch.Tensor]:
    """The embeddings stored at ``path`` by name (empty when missing or unreadable)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return dict(zip(data["names"], data["embeddings"], strict=True))
    except Exception:  # noqa: BLE001 - a broken cache file is recomputed, never fatal
        return {}


def _write_cache(path: Path, tkey: tuple[str, ...], new: dict[str, torch.Tensor]) -> None:
    """Merge ``new`` into the file at ``path`` (atomically; failures are ignored)."""
    try:
        merged = {**_read_cache(path), **new}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"templates": list(tkey), "names": list(merged),
                    "embeddings": torch.stack(list(merged.values()))}, tmp)
        os.replace(tmp, path)
    except OSError:
        pass


@torch.inference_mode()
def embed_names(
    bundle,
    names: Sequence[str],
    templates: TemplateSpec = None,
    batch_size: int = 512,
    cache: bool = True,
) -> torch.Tensor:
    """Template-averaged embedding per name: (len(names), D), float32, L2-normalised.

    Results are cached per model and template set in memory and, when ``cache`` and
    :func:`text_cache_dir` allow, on disk (see the module docstring), so repeated calls
    are free.
    """
    templates = resolve_templates(templates)
    tkey = tuple(t("{}") if callable(t) else str(t) for t in templates)
    fmt = [t if callable(t) else (lambda c, s=str(t): s.format(c)) for t in templates]
    mem = _CACHE.setdefault(bundle.model, {})
    todo = [n for n in dict.fromkeys(names) if (tkey, n) not in mem]
    root = text_cache_dir() if cache else None
    path = _cache_file(bundle.model, tkey, root) if (todo and root is not None) else None
    if path is not None:
        stored = _read_cache(path)
        for n in todo:
            if n in stored:
                mem[(tkey, n)] = stored[n]
        todo = [n for n in todo if n not in stored]
    if todo:
        device = next(bundle.model.parameters()).device
        prompts = [f(n) for n in todo for f in fmt]
        chunks = []
        for i in range(0, len(prompts), batch_size):
            tokens = bundle.tokenizer(prompts[i : i + batch_size]).to(device)
            chunks.append(F.normalize(_encode_text(bundle.model, tokens).float(), dim=-1))
        per = torch.cat(chunks).view(len(todo), len(fmt), -1)
        mean = F.normalize(per.mean(dim=1), dim=-1).cpu()
        for n, e in zip(todo, mean, strict=True):
            mem[(tkey, n)] = e
        if path is not None:
            _write_cache(path, tkey, dict(zip(todo, mean, strict=True)))
    return torch.stack([mem[(tkey, n)] for n in names])


def embed_queries(
    bundle,
    classes: ClassSpec,
    templates: TemplateSpec = None,
    *,
    allow_duplicates: bool = False,
    cache: bool = True,
) -> Queries:
    """Embed every name of every class.

    Args:
        bundle: a :class:`sfp.models.loading.ModelBundle`.
        classes: see :func:`parse_classes`.
        templates: a template set name (:data:`TEMPLATES`), callables ``name -> prompt`` or
            format strings with ``{}``; None = the 80 OpenAI ImageNet templates.
        cache: use the disk cache (:func:`embed_names`).
    """
    parsed = parse_classes(classes, allow_duplicates)
    names = [n for syns in parsed for n in syns]
    q2c = torch.tensor([ci for ci, syns in enumerate(parsed) for _ in syns], dtype=torch.long)
    emb = embed_names(bundle, names, templates, cache=cache)
    return Queries(emb, q2c, [syns[0] for syns in parsed], names)
