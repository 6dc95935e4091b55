"""helpers.models: the registry contract (forward, backward, features), the hybrid's shapes
step by step, and TimmModel's offline pretrained weights."""
from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from helpers.config import CFG, ROOT, cfg_from_dict, to_dict
from helpers.models import MODELS, HybridModel, TimmModel, create_model, stem_changes


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# small settings per architecture, so every registered model runs in well under a second
ARCH_KWARGS = {
    "timm": dict(model_name="resnet18", img_size=32, pretrained=False),
    "hybrid": dict(img_size=32, model_kwargs={"patch_size": 8}),
}


def small_cfg(arch: str, **kw) -> CFG:
    return CFG(arch=arch, **{"img_size": 32, **ARCH_KWARGS.get(arch, {}), **kw})


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("num_outputs", [5, 1])
def test_registry_forward_backward(arch, num_outputs):
    torch.manual_seed(0)
    cfg = small_cfg(arch)
    model = create_model(cfg, num_outputs)
    assert isinstance(model, MODELS[arch])
    assert isinstance(model.num_features, int) and model.num_features > 0
    model.train()
    x = torch.randn(3, cfg.in_chans, cfg.img_size, cfg.img_size)
    out = model(x)
    assert out.shape == (3, num_outputs)
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())

    model.eval()
    with torch.no_grad():
        feats = model.features(x)
        out2 = model(x)
    assert feats.shape == (3, model.num_features)
    assert torch.isfinite(feats).all()
    assert not torch.isnan(out2).any()
    # eval mode is deterministic
    with torch.no_grad():
        assert torch.allclose(model(x), out2)


@pytest.mark.parametrize("arch", list(MODELS))
def test_registry_one_channel_input(arch):
    cfg = small_cfg(arch, in_chans=1)
    model = create_model(cfg, 3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, cfg.img_size, cfg.img_size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


# --- the hybrid CNN-transformer, step by step ---------------------------------------------
@torch.no_grad()
def test_hybrid_exact_shapes():
    torch.manual_seed(0)
    cfg = CFG(arch="hybrid", img_size=480, in_chans=3, model_kwargs=dict(patch_size=120, featured_patch_dim=32, emb_dim=24,
                                                                     num_heads=4, patch_channels=[32, 64]))
    model = HybridModel(cfg, 2).eval()
    x = torch.randn(16, 3, 480, 480)
    assert x.shape == (16, 3, 480, 480)

    patches = model.encoder.patches(x)
    assert patches.shape == (256, 3, 120, 120)  # 16 images x (480/120)^2 patches
    feats = model.encoder.pool(model.encoder.cnn(patches))
    assert feats.shape == (256, 32)
    enc = model.encoder(x)
    assert enc.shape == (16, 16, 32)
    assert torch.allclose(enc, feats.view(16, 16, 32), atol=1e-5)

    assert model.decoder.kv(enc).shape == (16, 16, 24)
    assert model.decoder.q(16).shape == (16, 1, 24)
    dec = model.decoder(enc)
    assert dec.shape == (16, 1, 24)

    assert model.to_classifier.proj(dec).shape == (16, 1, 32)
    flat = model.to_classifier(dec)
    assert flat.shape == (16, 32)
    assert model.num_features == 32

    out = model(x)
    assert out.shape == (16, 2)
    assert torch.allclose(out, model.classifier(flat), atol=1e-5)
    assert torch.isfinite(out).all()


def test_hybrid_patches_row_major():
    """Patch i of an image is the i-th patch in row-major order."""
    model = HybridModel(CFG(arch="hybrid", img_size=8, model_kwargs={"patch_size": 4}), 2)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8).repeat(1, 3, 1, 1)
    p = model.encoder.patches(x)
    assert p.shape == (8, 3, 4, 4)
    assert torch.equal(p[0], x[0, :, :4, :4])
    assert torch.equal(p[1], x[0, :, :4, 4:])
    assert torch.equal(p[2], x[0, :, 4:, :4])
    assert torch.equal(p[3], x[0, :, 4:, 4:])
    assert torch.equal(p[4], x[1, :, :4, :4])


def test_hybrid_many_labels_use_ceil_queries():
    cfg = CFG(arch="hybrid", img_size=32, model_kwargs=dict(patch_size=8, featured_patch_dim=32, emb_dim=24, num_heads=4))
    model = HybridModel(cfg, 70).eval()
    assert model.decoder.num_queries == 3  # ceil(70 / 32)
    assert model.num_features == 96
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.decoder(model.encoder(x)).shape == (2, 3, 24)
        assert model.features(x).shape == (2, 96)
        assert model(x).shape == (2, 70)
    assert HybridModel(cfg, 64).decoder.num_queries == 2
    assert HybridModel(cfg, 65).decoder.num_queries == 3


def test_hybrid_img_size_not_multiple_of_patch():
    with pytest.raises(ValueError, match="patch_size"):
        HybridModel(CFG(arch="hybrid", img_size=30, model_kwargs={"patch_size": 8}), 2)


# --- TimmModel ------------------------------------------------------------------------------
def test_timm_pretrained_path_missing(tmp_path):
    cfg = CFG(model_name="resnet18", pretrained=True, pretrained_path=str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError) as e:
        TimmModel(cfg, 3)
    assert "pretrained_path" in str(e.value)
    assert "nope.safetensors" in str(e.value)


def test_timm_pretrained_without_internet_says_what_to_do(tmp_path):
    """A Kaggle kernel with internet off and no pretrained_path: the hub's error, plus the fix."""
    import subprocess
    import sys

    code = ("from helpers.config import CFG\nfrom helpers.models import create_model\n"
            "create_model(CFG(model_name='resnet18', pretrained=True), 3)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # no network, empty cache
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: experiment 'exp': no pretrained weights for model 'resnet18'")
    assert all(w in last for w in ("HF_HUB_OFFLINE is set", "pretrained_path:", "weights_dir:", "pretrained: false"))


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    torch.manual_seed(123)
    src = timm.create_model("resnet18", num_classes=0)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file(state, str(path))
    return path, state


def test_timm_pretrained_path_safetensors_loads_weights(resnet18_weights):
    path, state = resnet18_weights
    model = TimmModel(CFG(model_name="resnet18", pretrained=True, pretrained_path=str(path)), 4)
    got = model.backbone.state_dict()
    assert torch.equal(got["conv1.weight"], state["conv1.weight"])
    assert torch.equal(got["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    mismatched = [k for k in state if not torch.equal(got[k], state[k])]
    assert not mismatched
    # a model without the weights differs
    fresh = TimmModel(CFG(model_name="resnet18", pretrained=False), 4)
    assert not torch.equal(fresh.backbone.conv1.weight, state["conv1.weight"])
    assert model.head[-1].out_features == 4


def test_timm_pretrained_path_pth(tmp_path, resnet18_weights):
    _, state = resnet18_weights
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = TimmModel(CFG(model_name="resnet18", pretrained=True, pretrained_path=str(path)), 2)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])


def test_timm_pretrained_path_ignored_when_not_pretrained(tmp_path):
    # pretrained=False never touches pretrained_path (it need not exist)
    model = TimmModel(CFG(model_name="resnet18", pretrained=False, pretrained_path=str(tmp_path / "nope.pth"), img_size=32), 2)
    assert model.num_features == 512


def test_timm_unknown_model_name():
    with pytest.raises(ValueError) as e:
        TimmModel(CFG(model_name="resnet_does_not_exist"), 2)
    assert "model_name" in str(e.value)
    assert "resnet_does_not_exist" in str(e.value)


def test_timm_num_features_from_backbone():
    cfg = CFG(model_name="resnet18", img_size=32, pretrained=False)
    model = TimmModel(cfg, 3).eval()
    assert model.num_features == 512
    with torch.no_grad():
        assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_timm_pretrained_path_of_another_architecture_is_a_clear_error(resnet18_weights):
    path, _ = resnet18_weights if isinstance(resnet18_weights, tuple) else (resnet18_weights, None)
    with pytest.raises(ValueError) as e:
        TimmModel(CFG(model_name="resnet34", pretrained=True, pretrained_path=str(path)), 2)
    assert "pretrained_path" in str(e.value) and "resnet34" in str(e.value)


@pytest.mark.parametrize("name, size, min_map, changes, side", [
    ("resnet18", 32, 4, ("maxpool removed", "conv1 stride 2 -> 1"), 4),  # CIFAR's ResNet: 4x4 before pooling
    ("resnet18", 28, 2, ("maxpool removed",), 2),  # 28 -> 14, 14, 7, 4, 2
    ("resnet18", 64, 4, ("maxpool removed",), 4),
    ("resnet18", 128, 4, (), 4),  # big enough: timm's stem
    ("resnet18", 32, 0, (), 1),  # 0: timm's stem at any size
    ("efficientnet_b0", 32, 4, ("conv_stem stride 2 -> 1",), 2),  # no max-pool to remove
])
def test_small_images_get_a_stem_that_keeps_a_map(name, size, min_map, changes, side):
    """A timm CNN's stem divides the side by 4 before its first block (a ResNet's last stage is
    1x1 at 32 px): min_feature_map gives strides back, the max-pool first; the weights keep their
    shapes (pretrained weights load as they are) and stem_changes foretells it without weights."""
    cfg = CFG(model_name=name, img_size=size, min_feature_map=min_map, pretrained=False)
    model = TimmModel(cfg, 3).eval()
    assert tuple(model.stem_changes) == changes == stem_changes(cfg)
    with torch.no_grad():
        assert model.backbone.forward_features(torch.randn(1, 3, size, size)).shape[-1] == side
    plain = timm.create_model(name, pretrained=False, num_classes=0)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in model.backbone.state_dict().items()}


def test_a_checkpoint_saved_before_min_feature_map_keeps_timms_stem():
    """A config saved before the key existed was trained with timm's stem: loading it builds that
    stem, whatever the default now."""
    saved = {k: v for k, v in to_dict(CFG(img_size=32, min_feature_map=4)).items() if k != "min_feature_map"}
    assert cfg_from_dict(saved).min_feature_map == 0
    assert cfg_from_dict(to_dict(CFG(img_size=32, min_feature_map=4))).min_feature_map == 4
