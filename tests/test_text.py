"""Class lists, prompt templates and query embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sfp.models import text
from sfp.models.text import ClassListError


def test_read_class_file_synonyms(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("sky, wall,tree\n\ncat\n dog \n", encoding="utf-8")
    assert text.read_class_file(p) == [["sky", "wall", "tree"], ["cat"], ["dog"]]


def test_benchmark_lists_shipped_and_sized():
    from sfp.seg.benchmarks import benchmark_classes, class_list

    sizes = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81,
             "coco_stuff164k": 171, "cityscapes": 19, "ade20k": 150}
    for name, n in sizes.items():
        assert len(benchmark_classes(name)) == n
    voc = benchmark_classes("voc21")
    assert len(voc[0]) > 10 and "sky" in voc[0] and voc[1] == ["aeroplane"]
    classes, names = class_list("voc21")
    assert classes == voc and names[:2] == ["background", "aeroplane"]
    assert class_list("cat; dog, puppy") == ([["cat"], ["dog", "puppy"]], ["cat", "dog"])


def test_unknown_benchmark_suggests():
    from sfp.core.errors import RegistryError
    from sfp.seg.benchmarks import benchmark_classes

    with pytest.raises(RegistryError, match="Did you mean 'voc21'"):
        benchmark_classes("voc2l")


def test_template_sets_are_one_registry():
    assert text.resolve_templates("simple") == ("a photo of a {}.",)
    assert text.resolve_templates(None) == text.OPENAI_TEMPLATES
    assert len(text.resolve_templates("openai80")) == 80
    assert text.templates_key(None) == "openai80" == text.templates_key("openai80")
    assert text.templates_key(["x {}"]) == ["x {}"]
    with pytest.raises(ValueError, match="unknown template set 'fancy'"):
        text.resolve_templates("fancy")


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "empty"),
        (["cat", ""], "empty name"),
        (["cat, , kitty"], "empty name"),
        (["cat", "dog, cat"], "class 0 and class 1"),
        ([["cat", "cat"]], "twice"),
        ("", "empty"),
        (42, "must be"),
    ],
)
def test_bad_class_lists(bad, match):
    with pytest.raises(ClassListError, match=match):
        text.parse_classes(bad)


def test_parse_forms(tmp_path):
    assert text.parse_classes("cat; dog, puppy ; grass") == [["cat"], ["dog", "puppy"], ["grass"]]
    assert text.parse_classes(["cat", ["dog", "puppy"]]) == [["cat"], ["dog", "puppy"]]
    with pytest.raises(ClassListError):  # benchmark names are resolved by sfp.seg.benchmarks
        text.parse_classes("")
    f = tmp_path / "x.txt"
    f.write_text("a\nb, c\n")
    assert text.parse_classes(str(f)) == [["a"], ["b", "c"]]


def test_templates_are_open_clips_80():
    import open_clip

    assert len(text.OPENAI_TEMPLATES) == 80
    assert text.OPENAI_TEMPLATES[0]("cat") == open_clip.OPENAI_IMAGENET_TEMPLATES[0]("cat")


@torch.no_grad()
def test_embedding_matches_definition(tiny_vit):
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    q = text.embed_queries(tiny_vit, [["cat", "kitten"], "dog"], templates=templates)
    assert q.embeddings.shape == (3, tiny_vit.embed_dim)
    assert q.query_to_class.tolist() == [0, 0, 1]
    assert q.class_names == ["cat", "dog"] and q.names == ["cat", "kitten", "dog"]
    for i, name in enumerate(q.names):
        tokens = tiny_vit.tokenizer([t.format(name) for t in templates])
        per = F.normalize(tiny_vit.model.encode_text(tokens), dim=-1)  # untrimmed reference
        expect = F.normalize(per.mean(0), dim=-1)
        assert (q.embeddings[i] - expect).abs().max() < 1e-5
    assert torch.allclose(q.embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_cache_hits(tiny_vit, monkeypatch):
    calls = []
    real = text._encode_text

    def counting(model, tokens):
        calls.append(tokens.shape[0])
        return real(model, tokens)

    monkeypatch.setattr(text, "_encode_text", counting)
    templates = ["a {}.", "the {}."]
    first = text.embed_queries(tiny_vit, "owl; newt", templates=templates)
    n = len(calls)
    again = text.embed_queries(tiny_vit, "newt; owl", templates=templates)
    assert len(calls) == n  # nothing re-encoded
    assert torch.equal(first.embeddings[0], again.embeddings[1])
    text.embed_queries(tiny_vit, "owl; toad", templates=templates)
    assert calls[n:] == [2]  # only the new name, two prompts


def test_empty_templates(tiny_vit):
    with pytest.raises(ClassListError, match="templates"):
        text.embed_queries(tiny_vit, "cat", templates=[])
