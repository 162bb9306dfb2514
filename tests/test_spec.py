"""Tests for the request spec (spinml_ray/spec.py): loading, URI resolution, and error messages."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import yaml
from conftest import EXAMPLE_REQUEST
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from spinml_ray.spec import RECIPES, Level, PrivacySpec, RequestSpec, SpecError, load_request, parse_request


def base_document() -> dict:
    """A small, valid request document with relative URIs."""
    return {
        "request_id": "req-1",
        "tenant": "acme",
        "task": "classification",
        "subject": "husky dog",
        "labels": [
            {"name": "sleeping", "phrase": "sleeping on a rug"},
            {"name": "eating", "phrase": "eating from a bowl"},
        ],
        "references": [
            {"uri": "refs/a.png", "label": "sleeping", "mask_uri": "masks/a.png"},
            {"uri": "refs/b.png", "label": "eating", "box": [1, 2, 30, 40]},
        ],
        "privacy": {"target": "L2", "background": "L0", "alpha": 0.25},
        "synthesis": {"images_per_label": 4, "resolution": 64, "steps": 4},
        "training": {"architecture": "resnet18", "epochs": 1},
        "test_set": "test_set",
    }


def with_change(path: tuple, value) -> dict:
    """A copy of the base document with the field at `path` set to `value`."""
    document = base_document()
    node = document
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return document


def error_of(document, **kwargs) -> str:
    with pytest.raises(SpecError) as info:
        parse_request(document, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- the shipped example


def test_example_request_loads_with_absolute_existing_uris():
    spec = load_request(EXAMPLE_REQUEST)
    assert isinstance(spec, RequestSpec)
    with open(EXAMPLE_REQUEST) as handle:
        raw = yaml.safe_load(handle)
    assert len(spec.references) == len(raw["references"]) > 0
    example_dir = os.path.dirname(EXAMPLE_REQUEST)
    for ref, raw_ref in zip(spec.references, raw["references"]):
        assert not os.path.isabs(raw_ref["uri"])  # the document itself is relative ...
        assert os.path.isabs(ref.uri) and os.path.isfile(ref.uri)  # ... the spec is resolved
        assert os.path.samefile(ref.uri, os.path.join(example_dir, raw_ref["uri"]))
        assert ref.mask_uri is not None and os.path.isabs(ref.mask_uri) and os.path.isfile(ref.mask_uri)
        assert ref.label in spec.label_names
    assert spec.test_set is not None and os.path.isabs(spec.test_set) and os.path.isdir(spec.test_set)
    assert spec.privacy.config == f"{raw['privacy']['target']}_{raw['privacy']['background']}"
    assert spec.synthesis.resolution == raw["synthesis"]["resolution"]


def test_example_request_loads_through_relative_path(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(EXAMPLE_REQUEST)))
    spec = load_request(os.path.join("examples", "request.yaml"))
    for ref in spec.references:
        assert os.path.isabs(ref.uri) and os.path.isfile(ref.uri)


# ---------------------------------------------------------------- resolution


def test_parse_without_base_keeps_uris_as_given():
    spec = parse_request(base_document())
    assert [r.uri for r in spec.references] == ["refs/a.png", "refs/b.png"]
    assert spec.references[0].mask_uri == "masks/a.png"
    assert spec.test_set == "test_set"


def test_parse_resolves_relative_uris_against_base(tmp_path):
    document = base_document()
    base = tmp_path / "req"
    document["references"][1]["uri"] = str(base / "sub" / ".." / "b.png")
    document["references"].append({"uri": "./c/./d.png", "label": "eating"})
    spec = parse_request(document, base_uri=str(base))
    uris = [r.uri for r in spec.references]
    assert uris[0] == str(base / "refs" / "a.png")
    assert uris[1] == str(base / "b.png")  # absolute inside the folder: normalised
    assert uris[2] == str(base / "c" / "d.png")
    assert spec.references[0].mask_uri == str(base / "masks" / "a.png")
    assert spec.references[1].mask_uri is None
    assert spec.test_set == str(base / "test_set")
    assert spec.training.pretrained == "auto"  # the default, a keyword and not a file
    document["training"]["pretrained"] = "weights/resnet18.pth"
    assert parse_request(document, base_uri=str(base)).training.pretrained == str(base / "weights" / "resnet18.pth")
    document["training"]["pretrained"] = "none"
    assert parse_request(document, base_uri=str(base)).training.pretrained == "none"


@pytest.mark.parametrize("field, outside", [
    ("references.0.uri", "/elsewhere/b.png"), ("references.0.uri", "../up.png"),
    ("references.0.uri", "s3://bucket/c.png"), ("references.0.mask_uri", "../req-other/m.png"),
    ("test_set", "/etc"), ("test_set", "https://example.org/x"),
    ("training.pretrained", "../other/resnet18.pth"), ("training.pretrained", "s3://bucket/w.pth"),
])
def test_parse_refuses_uris_outside_the_request_folder(tmp_path, field, outside):
    document = base_document()
    if field == "test_set":
        document["test_set"] = outside
    elif field == "training.pretrained":
        document["training"]["pretrained"] = outside
    else:
        document["references"][0][field.split(".")[-1]] = outside
    with pytest.raises(SpecError, match=field.replace(".", r"\.") + ".*outside"):
        parse_request(document, base_uri=str(tmp_path / "req"))


def test_parse_refuses_a_bundle_outside_the_request_folder(tmp_path):
    document = {**base_document(), "references": [], "bundle": "../../other-tenant/r/sanitized"}
    with pytest.raises(SpecError, match="bundle.*outside"):
        parse_request(document, base_uri=str(tmp_path / "tenant" / "req"))


def test_parse_resolves_against_s3_base():
    spec = parse_request(base_document(), base_uri="s3://bucket/tenant/req")
    assert spec.references[0].uri == "s3://bucket/tenant/req/refs/a.png"
    assert spec.references[0].mask_uri == "s3://bucket/tenant/req/masks/a.png"
    assert spec.test_set == "s3://bucket/tenant/req/test_set"


# ---------------------------------------------------------------- one invalid field at a time

INVALID_FIELDS = [
    # (id, path, bad value, dotted path expected in the message, value text expected in the message)
    ("level", ("privacy", "target"), "L3", "privacy.target", "'L3'"),
    ("alpha", ("privacy", "alpha"), 1.5, "privacy.alpha", "1.5"),
    ("resolution", ("synthesis", "resolution"), 100, "synthesis.resolution", "100"),
    ("steps", ("synthesis", "steps"), 0, "synthesis.steps", "0"),
    ("request_id_slash", ("request_id",), "a/b", "request_id", "'a/b'"),
    ("request_id_space", ("request_id",), "a b", "request_id", "'a b'"),
    ("tenant_empty", ("tenant",), "", "tenant", "''"),
    ("box", ("references", 1, "box"), [30, 2, 30, 40], "references.1.box", "[30, 2, 30, 40]"),
    ("box_reversed", ("references", 1, "box"), [30, 2, 10, 40], "references.1.box", "[30, 2, 10, 40]"),
    ("architecture", ("training", "architecture"), "vgg", "training.architecture", "'vgg'"),
    ("unknown_top_level", ("colour",), "purple", "colour", "'purple'"),
    ("unknown_nested", ("synthesis", "sampler"), "ddim", "synthesis.sampler", "'ddim'"),
]


@pytest.mark.parametrize("path, value, field, shown", [c[1:] for c in INVALID_FIELDS], ids=[c[0] for c in INVALID_FIELDS])
def test_invalid_field_is_named_with_its_value(path, value, field, shown):
    message = error_of(with_change(path, value))
    assert re.search(rf"(^|[\s;:]){re.escape(field)} = {re.escape(shown)}", message), message
    # only that field is reported
    assert message.count(" = ") == 1, message


def test_labels_with_one_entry():
    document = base_document()
    document["labels"] = [{"name": "solo-label", "phrase": "alone"}]
    document["references"] = [{"uri": "a.png"}]
    message = error_of(document)
    assert "labels" in message and "at least 2" in message


def test_duplicate_label_names():
    document = base_document()
    document["labels"].append({"name": "sleeping", "phrase": "asleep again"})
    message = error_of(document)
    assert "labels" in message and "duplicate" in message
    assert "'sleeping'" in message


def test_reference_label_not_among_labels():
    message = error_of(with_change(("references", 1, "label"), "running"))
    assert re.search(r"references(\.1|\[1\])\.label", message), message
    assert "'running'" in message


def test_detection_defaults_to_a_detector_and_takes_one_label():
    document = with_change(("task",), "detection")
    del document["training"]["architecture"]
    document["labels"] = document["labels"][:1]
    document["references"] = [{"uri": "refs/a.png", "mask_uri": "masks/a.png"}]
    spec = parse_request(document)
    assert spec.training.architecture == "ssdlite320_mobilenet_v3_large"
    assert spec.training.epochs == 1  # the other training settings are kept
    assert parse_request(with_change(("task",), "classification")).training.architecture == "resnet18"


def test_architecture_must_fit_the_task():
    message = error_of(with_change(("task",), "detection"))  # base document asks for resnet18
    assert "training.architecture" in message and "'resnet18'" in message and "detection" in message
    document = with_change(("training", "architecture"), "ssdlite320_mobilenet_v3_large")
    assert "cannot do classification" in error_of(document)


def test_classification_needs_two_labels():
    document = base_document()
    document["labels"] = document["labels"][:1]
    document["references"] = [{"uri": "refs/a.png", "mask_uri": "masks/a.png"}]
    assert "at least 2 labels" in error_of(document)


def test_unknown_task_is_rejected_with_value():
    message = error_of(with_change(("task",), "segmentation"))
    assert "task = 'segmentation'" in message


def test_min_references_more_than_given():
    message = error_of(with_change(("min_references",), 3))
    assert "min_references" in message
    assert "3" in message and "2 references" in message


def test_min_references_equal_to_given_is_accepted():
    spec = parse_request(with_change(("min_references",), 2))
    assert spec.min_references == 2


def test_missing_subject_is_named():
    document = base_document()
    del document["subject"]
    message = error_of(document)
    assert "subject" in message
    assert "required" in message.lower()


def test_missing_subject_message_does_not_dump_the_document():
    document = base_document()
    del document["subject"]
    message = error_of(document)
    assert "husky" not in message and "refs/a.png" not in message, message


def test_several_errors_are_all_reported():
    document = base_document()
    document["privacy"]["alpha"] = 1.5
    document["synthesis"]["steps"] = 0
    document["tenant"] = ""
    document["training"]["architecture"] = "vgg"
    message = error_of(document)
    for expected in ("privacy.alpha = 1.5", "synthesis.steps = 0", "tenant = ''", "training.architecture = 'vgg'"):
        assert expected in message, message


def test_valid_document_parses_into_typed_objects():
    spec = parse_request(base_document())
    assert spec.privacy.target is Level.L2 and spec.privacy.background is Level.L0
    assert spec.references[1].box == (1, 2, 30, 40)
    assert spec.label_names == ["sleeping", "eating"]
    assert spec.training.architecture == "resnet18"


@pytest.mark.parametrize("target, background", [("L0", "L0"), ("L2", "L0"), ("L1", "L2"), ("L0", "L1")])
def test_privacy_config_name(target, background):
    privacy = PrivacySpec(target=target, background=background)
    assert privacy.config == f"{target}_{background}"
    assert parse_request(with_change(("privacy",), {"target": target, "background": background})).privacy.config == (
        f"{target}_{background}"
    )


# ---------------------------------------------------------------- documents and files


@pytest.mark.parametrize("document", [["a", "b"], "just text", 42, None])
def test_non_mapping_document(document):
    message = error_of(document, source="my-request")
    assert message.startswith("my-request")
    assert "mapping" in message and type(document).__name__ in message


def test_non_mapping_yaml_file(tmp_path):
    path = tmp_path / "request.yaml"
    path.write_text("- one\n- two\n")
    with pytest.raises(SpecError, match="mapping") as info:
        load_request(str(path))
    assert str(path) in str(info.value)


def test_invalid_yaml_text(tmp_path):
    path = tmp_path / "request.yaml"
    path.write_text("request_id: [unclosed\ntenant: x\n")
    with pytest.raises(SpecError) as info:
        load_request(str(path))
    assert str(path) in str(info.value)
    assert "YAML" in str(info.value)


def test_invalid_json_text(tmp_path):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(base_document())[:-1] + ",}")
    with pytest.raises(SpecError) as info:
        load_request(str(path))
    assert str(path) in str(info.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "request.yaml"
    path.write_bytes(b"request_id: \xff\xfe\n")
    with pytest.raises(SpecError, match="UTF-8"):
        load_request(str(path))


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nowhere" / "request.yaml")
    with pytest.raises(SpecError) as info:
        load_request(path)
    assert path in str(info.value)
    assert "not found" in str(info.value)


def test_json_document_loads_and_resolves(tmp_path):
    path = tmp_path / "sub" / "request.json"
    path.parent.mkdir()
    path.write_text(json.dumps(base_document()))
    spec = load_request(str(path))
    assert spec.request_id == "req-1"
    assert spec.references[0].uri == str(tmp_path / "sub" / "refs" / "a.png")
    assert spec.test_set == str(tmp_path / "sub" / "test_set")


def test_yaml_and_json_give_the_same_spec(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(base_document()))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(base_document()))
    assert load_request(str(tmp_path / "r.json")) == load_request(str(tmp_path / "r.yaml"))


def test_load_request_reports_field_errors_with_the_file(tmp_path):
    path = tmp_path / "request.yaml"
    path.write_text(yaml.safe_dump(with_change(("privacy", "alpha"), 1.5)))
    with pytest.raises(SpecError) as info:
        load_request(str(path))
    assert str(info.value).startswith(str(path))
    assert "privacy.alpha = 1.5" in str(info.value)


def test_parse_does_not_mutate_the_document():
    document = base_document()
    before = copy.deepcopy(document)
    parse_request(document, base_uri="/base")
    assert document == before


@pytest.mark.parametrize("field", ["request_id", "tenant"])
def test_id_with_trailing_newline_is_rejected(field):
    message = error_of(with_change((field,), "req-1\n"))
    assert field in message


def test_example_request_loads_through_file_uri():
    spec = load_request("file://" + os.path.abspath(EXAMPLE_REQUEST))
    for ref in spec.references:
        assert os.path.isfile(ref.uri.removeprefix("file://")), ref.uri


# ---------------------------------------------------------------- named recipes


def test_the_paper_recipe_gives_the_papers_settings_end_to_end():
    document = {key: value for key, value in base_document().items() if key not in ("synthesis", "training")}
    spec = parse_request({**document, "recipe": "spinml-paper"})
    synthesis, training, personalization = spec.synthesis, spec.training, spec.personalization
    assert (synthesis.resolution, synthesis.steps, synthesis.guidance, synthesis.scheduler) == (512, 50, 7.5, "pndm")
    assert synthesis.negative_prompt == "" and synthesis.prompt_decorations is False
    assert synthesis.l2_target == "personalized_text"
    assert (personalization.token, personalization.steps, personalization.resolution) == ("sks", 400, 512)
    assert (personalization.method, personalization.learning_rate) == ("full", 5e-6)  # DreamBooth as published
    lora = parse_request({**document, "recipe": "spinml-paper", "personalization": {"method": "lora"}})
    assert lora.personalization.learning_rate == 1e-4  # LoRA under the recipe keeps LoRA's own rate
    assert (training.architecture, training.image_size, training.learning_rate, training.epochs,
            training.batch_size, training.pretrained) == ("mobilenet_v2", 224, 1e-3, 5, 128, "auto")
    assert spec.recipe == "spinml-paper"
    # without the recipe, the project's defaults: the recipe is what changed them
    plain = parse_request(document)
    assert (plain.synthesis.scheduler, plain.synthesis.prompt_decorations, plain.synthesis.l2_target) == (
        "dpmsolver++", True, "kept")


def test_a_requests_own_settings_win_over_its_recipe():
    document = with_change(("synthesis",), {"steps": 20, "scheduler": "ddim"})
    spec = parse_request({**document, "recipe": "spinml-paper"})
    assert (spec.synthesis.steps, spec.synthesis.scheduler) == (20, "ddim")
    assert spec.synthesis.guidance == 7.5  # not set by the request: the recipe's
    assert spec.training.architecture == "resnet18" and spec.training.epochs == 1


def test_a_detection_request_keeps_a_detector_under_the_paper_recipe():
    document = with_change(("task",), "detection")
    document["labels"] = document["labels"][:1]
    document["references"] = [{**ref, "label": "sleeping"} for ref in document["references"]]
    del document["training"]
    spec = parse_request({**document, "recipe": "spinml-paper"})
    assert spec.training.architecture == "ssdlite320_mobilenet_v3_large"


@given(name=st.one_of(st.text(max_size=80), st.integers(), st.lists(st.text(max_size=5), max_size=2)))
@settings(max_examples=150, deadline=None)
def test_a_recipe_is_a_name_from_the_list_never_a_path(name):
    assume(name not in RECIPES)
    message = error_of({**base_document(), "recipe": name})
    assert "recipe" in message and "spinml-paper" in message


def test_personalized_text_needs_personalization():
    document = with_change(("synthesis", "l2_target"), "personalized_text")
    document["personalization"] = {"enabled": False}
    assert "synthesis.l2_target" in error_of(document)
    document["privacy"] = {"target": "L1", "background": "L0"}  # no L2 target: nothing to draw from text
    assert parse_request(document).synthesis.l2_target == "personalized_text"


def test_full_dreambooth_takes_its_own_rate_unless_one_is_named():
    from spinml_ray.spec import FULL_DREAMBOOTH_LEARNING_RATE, PersonalizationSpec

    assert PersonalizationSpec().method == "lora" and PersonalizationSpec().learning_rate == 1e-4
    assert PersonalizationSpec(method="full").learning_rate == FULL_DREAMBOOTH_LEARNING_RATE == 5e-6
    assert PersonalizationSpec(method="full", learning_rate=1e-5).learning_rate == 1e-5
    with pytest.raises(ValidationError):
        PersonalizationSpec(method="partial")
