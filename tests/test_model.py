"""src/model.py: the spec parser, the size rule, the network, checkpoints and the CLI table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from src.model import (
    ACTIVATIONS,
    CNN,
    POOLS,
    SpecError,
    SumPool2d,
    build_config,
    load_checkpoint,
    save_checkpoint,
    shape_table,
)

REPO = Path(__file__).resolve().parents[1]


def make_cfg(layers, *, image_size=11, in_channels=2, num_classes=3, **section):
    return build_config(
        {"layers": layers, **section},
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
    )


def spec_for(pool, conv_stride, conv_padding, pool_stride, pool_padding):
    return [
        {
            "conv": 4,
            "kernel": 3,
            "stride": conv_stride,
            "padding": conv_padding,
            "batch_norm": True,
        },
        {"pool": pool, "size": 2, "stride": pool_stride, "padding": pool_padding},
        {"conv": 5, "kernel": 2, "activation": "gelu", "dropout": 0.1},
        {"fc": 8, "batch_norm": True, "dropout": 0.1},
        {"fc": 6, "activation": "tanh"},
    ]


# 'same' only with stride 1 (see test_same_padding_needs_odd_kernel_and_stride_1)
CONV = [(1, "same"), (1, "valid"), (1, 0), (2, 1), (2, "valid"), (1, 2)]
POOL = [(2, 0), (1, 0), (2, 1)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("conv_stride,conv_padding", CONV)
@pytest.mark.parametrize("pool_stride,pool_padding", POOL)
def test_forward_backward(pool, conv_stride, conv_padding, pool_stride, pool_padding):
    cfg = make_cfg(
        spec_for(pool, conv_stride, conv_padding, pool_stride, pool_padding), dropout=0.2
    )
    model = CNN(cfg).train()
    x = torch.randn(4, 2, 11, 11)
    out = model(x)
    assert out.shape == (4, 3)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    probs = model.eval().predict_proba(x)
    assert probs.shape == (4, 3)
    assert torch.allclose(probs.sum(1), torch.ones(4))
    feats = model.forward_features(x)
    assert feats.shape[:2] == (4, 5)
    assert model.forward_head(feats, pre_logits=True).shape == (4, 6)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_every_activation(act):
    cfg = make_cfg([{"conv": 3, "kernel": 3}, {"fc": 4}], activation=act)
    model = CNN(cfg)
    assert isinstance(model.features[0][-1], ACTIVATIONS[act])
    assert isinstance(model.fc[0][-1], ACTIVATIONS[act])
    assert torch.isfinite(model(torch.randn(2, 2, 11, 11))).all()


@pytest.mark.parametrize("size,stride,padding", [(2, 2, 0), (3, 1, 1), (3, 2, 1), (2, 1, 0)])
def test_sum_pool_is_avg_pool_times_window_area(size, stride, padding):
    sum_pool = POOLS["sum"](size, stride, padding)
    avg_pool = POOLS["avg"](size, stride, padding)
    assert isinstance(sum_pool, SumPool2d)
    area = size * size
    # integer pixels: the window sums are exact in float32, and so is the float64 average times
    # the area once rounded (a float32 average is itself rounded after dividing by 9)
    ints = torch.randint(0, 256, (2, 3, 9, 9)).float()
    assert torch.equal(sum_pool(ints), (avg_pool(ints.double()) * area).round().float())
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(sum_pool(x), avg_pool(x) * area, rtol=1e-5, atol=1e-5)


def _repo_layers():
    return yaml.safe_load((REPO / "params.yaml").read_text())["model"]["layers"]


@pytest.mark.parametrize(
    "layers,image_size",
    [
        (_repo_layers(), 20),
        (spec_for("sum", 2, 1, 1, 0), 11),
        (spec_for("avg", 1, "valid", 2, 1), 12),
        ([{"pool": "max", "size": 3, "stride": 2, "padding": 1}, {"conv": 3, "kernel": 1}], 7),
        ([{"fc": 5}, {"fc": 4, "batch_norm": True}], 6),
        (
            [
                {"conv": 4, "kernel": 3, "padding": "same", "batch_norm": True, "pool": "max"},
                {"conv": 3, "kernel": 2, "pool": "sum", "pool_size": 3},
                {"fc": 5},
            ],
            13,
        ),
    ],
)
def test_shape_table_matches_real_tensors(layers, image_size):
    cfg = make_cfg(layers, image_size=image_size)
    model = CNN(cfg).eval()
    modules = [*model.features, *model.fc, model.classifier]
    seen: list[tuple[int, int, int]] = []

    def hook(_module, _inputs, out):
        seen.append(
            (out.shape[2], out.shape[3], out.shape[1]) if out.ndim == 4 else (1, 1, out.shape[1])
        )

    for m in modules:
        m.register_forward_hook(hook)
    model(torch.randn(2, 2, image_size, image_size))
    rows = shape_table(cfg)
    assert rows[0].kind == "input" and rows[0].out == (image_size, image_size, 2)
    assert [r.out for r in rows[1:]] == seen
    assert [r.index for r in rows[1:-1]] == list(range(len(layers)))
    assert [r.params for r in rows[1:]] == [sum(p.numel() for p in m.parameters()) for m in modules]
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("pool", list(POOLS))
def test_conv_pool_runs_before_norm_and_activation(pool):
    cfg = make_cfg(
        [{"conv": 4, "kernel": 3, "padding": 1, "batch_norm": True, "pool": pool, "pool_size": 3}],
        image_size=9,
    )
    block = CNN(cfg).features[0]
    assert [type(m) for m in block] == [nn.Conv2d, POOLS[pool], nn.BatchNorm2d, nn.ReLU]
    assert (block[1].kernel_size, block[1].stride) == (3, 3)
    assert shape_table(cfg)[1].out == (3, 3, 4)
    assert shape_table(cfg)[1].desc == f"conv 3x3/1 pad 1, {pool} pool 3x3/3, bn, relu"


def test_conv_max_pool_without_norm_equals_a_pool_layer_after_relu():
    # max pooling commutes with a non-decreasing activation: the same network either way
    own = CNN(make_cfg([{"conv": 4, "kernel": 3, "pool": "max"}, {"fc": 3}]))
    separate = CNN(make_cfg([{"conv": 4, "kernel": 3}, {"pool": "max", "size": 2}, {"fc": 3}]))
    separate.load_state_dict(own.state_dict())
    x = torch.randn(5, 2, 11, 11)
    torch.testing.assert_close(own.eval()(x), separate.eval()(x))


def test_flip_tta_averages_an_image_and_its_mirror_in_eval_mode_only():
    layers = spec_for("max", 1, "same", 2, 0) + [{"fc": 6}]
    tta = CNN(make_cfg(layers, dropout=0.2, tta="flip"))
    plain = CNN(make_cfg(layers, dropout=0.2))
    plain.load_state_dict(tta.state_dict())
    x = torch.randn(5, 2, 11, 11)
    tta.eval(), plain.eval()
    torch.testing.assert_close(tta(x), (plain(x) + plain(x.flip(3))) / 2)
    torch.testing.assert_close(tta(x), tta(x.flip(3)))  # a mirror image gets the same answer
    torch.testing.assert_close(tta.predict_proba(x).sum(1), torch.ones(5))
    torch.manual_seed(0)
    train_out = tta.train()(x)  # training steps never average: same as the plain net
    torch.manual_seed(0)
    torch.testing.assert_close(train_out, plain.train()(x))
    assert shape_table(tta.cfg)[-1].desc == "dropout 0.2, linear (eval: tta flip)"


def test_same_padding_keeps_the_size():
    rows = shape_table(make_cfg([{"conv": 3, "kernel": k, "padding": "same"} for k in (1, 3, 5)]))
    assert [r.out[:2] for r in rows[1:-1]] == [(11, 11)] * 3


def test_collapse_names_layer_and_size():
    layers = [{"conv": 4, "kernel": 3}] * 4  # 8 -> 6 -> 4 -> 2 -> 0
    cfg = make_cfg(layers, image_size=8)  # parsing alone passes: shapes are shape_table's job
    msg = "layers[3]: feature map collapses to 0x0 (input 2x2, kernel 3, stride 1, padding 0)"
    with pytest.raises(SpecError) as e:
        shape_table(cfg)
    assert str(e.value) == msg
    with pytest.raises(SpecError, match=r"^layers\[3\]: feature map collapses"):
        CNN(cfg)
    with pytest.raises(SpecError) as e:
        shape_table(make_cfg([{"conv": 4, "kernel": 1}, {"pool": "sum", "size": 3}], image_size=2))
    assert str(e.value) == (
        "layers[1]: feature map collapses to 0x0 (input 2x2, size 3, stride 3, padding 0)"
    )
    with pytest.raises(SpecError) as e:
        shape_table(make_cfg([{"conv": 4, "kernel": 3, "pool": "max", "pool_size": 12}]))
    assert str(e.value) == (  # the conv's own pooling, after the convolution's 11 -> 9
        "layers[0]: feature map collapses to 0x0 (input 9x9, pool_size 12, stride 12, padding 0)"
    )


@pytest.mark.parametrize(
    "section,message",
    [
        (
            {"layers": [{"conv": 4, "kernel": 3}, {"pool": "median", "size": 2}]},
            "layers[1].pool: unknown kind 'median' (expected max, avg, sum)",
        ),
        (
            {"layers": [{"conv": 4, "kernel": 3, "activation": "relux"}]},
            "layers[0].activation: unknown activation 'relux' "
            "(expected relu, gelu, silu, tanh, sigmoid, leaky_relu, elu)",
        ),
        (
            {"activation": "relux", "layers": [{"fc": 4}]},
            "activation: unknown activation 'relux' "
            "(expected relu, gelu, silu, tanh, sigmoid, leaky_relu, elu)",
        ),
        (
            {"layers": [{"conv": 4, "kernel": 3}, {"conv": 4, "kernel": 0}]},
            "layers[1].kernel: must be a positive integer (got 0)",
        ),
        (
            {"layers": [{"conv": 4, "kernel": 2.5}]},
            "layers[0].kernel: must be a positive integer (got 2.5)",
        ),
        (
            {"layers": [{"conv": True, "kernel": 3}]},
            "layers[0].conv: must be a positive integer (got True)",
        ),
        (
            {"layers": [{"conv": 4}]},
            "layers[0].kernel: missing (a conv layer needs its kernel size)",
        ),
        (
            {"layers": [{"pool": "max"}]},
            "layers[0].size: missing (a pool layer needs its window size)",
        ),
        (
            {"layers": [{"conv": 4, "fc": 8, "kernel": 3}]},
            "layers[0]: a layer must have exactly one of conv, pool, fc (got conv, fc)",
        ),
        (
            {"layers": [{"kernel": 3}]},
            "layers[0]: a layer must have exactly one of conv, pool, fc (got keys kernel)",
        ),
        (
            {"layers": ["conv"]},
            "layers[0]: expected a mapping such as {conv: 32, kernel: 3} (got 'conv')",
        ),
        (
            {"layers": [{"conv": 4, "kernel": 3, "foo": 1}]},
            "layers[0]: unknown key 'foo' for a conv layer "
            "(expected conv, kernel, stride, padding, pool, pool_size, batch_norm, activation, "
            "dropout)",
        ),
        (
            {"layers": [{"conv": 4, "kernel": 3, "pool": "median"}]},
            "layers[0].pool: unknown kind 'median' (expected max, avg, sum)",
        ),
        (
            {"layers": [{"conv": 4, "kernel": 3, "pool_size": 2}]},
            "layers[0].pool_size: given without pool (max, avg or sum)",
        ),
        (
            {"layers": [{"conv": 4, "kernel": 3, "pool": "max", "pool_size": 0}]},
            "layers[0].pool_size: must be a positive integer (got 0)",
        ),
        (
            {"layers": [{"pool": "max", "size": 2, "batch_norm": True}]},
            "layers[0]: unknown key 'batch_norm' for a pool layer "
            "(expected pool, size, stride, padding)",
        ),
        (
            {"layers": [{"fc": 4}, {"conv": 4, "kernel": 3}]},
            "layers[1]: conv after an fc layer (conv and pool layers must come first)",
        ),
        (
            {"layers": [{"conv": 4, "kernel": 3, "padding": "full"}]},
            "layers[0].padding: must be same, valid or an integer >= 0 (got 'full')",
        ),
        (
            {"layers": [{"pool": "avg", "size": 2, "padding": 2}]},
            "layers[0].padding: must be at most size // 2 = 1 (got 2)",
        ),
        (
            {"layers": [{"fc": 4, "dropout": 1.5}]},
            "layers[0].dropout: must be a number in [0, 1) (got 1.5)",
        ),
        (
            {"layers": [{"fc": 4, "batch_norm": "yes"}]},
            "layers[0].batch_norm: must be true or false (got 'yes')",
        ),
        ({"layers": []}, "layers: must be a non-empty list of layer specs (got [])"),
        (
            {"layers": [{"fc": 4}], "width": 2},
            "width: unknown key (expected activation, dropout, layers, tta)",
        ),
        (
            {"layers": [{"fc": 4}], "tta": "rotate"},
            "tta: unknown value 'rotate' (expected none, flip)",
        ),
    ],
)
def test_spec_errors_are_one_precise_line(section, message):
    with pytest.raises(SpecError) as e:
        build_config(section, in_channels=1, image_size=8, num_classes=2)
    assert str(e.value) == message
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kernel,stride", [(2, 1), (3, 2), (4, 2)])
def test_same_padding_needs_odd_kernel_and_stride_1(kernel, stride):
    layer = {"conv": 4, "kernel": kernel, "stride": stride, "padding": "same"}
    with pytest.raises(SpecError) as e:
        make_cfg([layer])
    assert str(e.value) == (
        f"layers[0].padding: 'same' needs an odd kernel and stride 1 "
        f"(got kernel {kernel}, stride {stride}); give an integer padding instead"
    )


def test_config_keeps_its_own_copy_of_the_specs():
    layers = [{"conv": 4, "kernel": 3}]
    cfg = make_cfg(layers)
    layers[0]["kernel"] = 99
    assert cfg.layers == [{"conv": 4, "kernel": 3}]


EXTRA = {
    "class_names": ["a", "b", "c"],
    "mean": [0.5, 0.25],
    "std": [0.2, 0.3],
    "image_size": 11,
    "channels": 2,
    "preprocess": {
        "resize": "stretch",
        "image_size": 7,
        "pad": 2,
        "fill": 0,
        "border_mode": "constant",
    },
}


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_checkpoint_round_trip(tmp_path, tta):
    cfg = make_cfg(spec_for("sum", 1, "same", 2, 0), dropout=0.2, tta=tta)
    model = CNN(cfg)
    model(torch.randn(8, 2, 11, 11))  # train-mode pass: moves the batch-norm running stats
    model = model.to(memory_format=torch.channels_last).eval()
    path = tmp_path / "models" / "model.pt"
    save_checkpoint(path, model, EXTRA)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left behind

    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model_config", "state_dict", "extra"}
    assert raw["model_config"]["layers"] == cfg.layers

    loaded, extra = load_checkpoint(path)
    assert extra == EXTRA
    assert not loaded.training
    assert loaded.cfg == cfg
    saved = model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    x = torch.randn(3, 2, 11, 11)
    # same weights; channels_last vs contiguous convolutions may round differently
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    loaded = loaded.to(memory_format=torch.channels_last)
    assert torch.equal(loaded.predict_proba(x), model.predict_proba(x))


def test_checkpoint_unwraps_a_wrapper(tmp_path):
    class Wrapper(nn.Module):  # stands in for DDP: the model is under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = CNN(make_cfg([{"fc": 3}]))
    save_checkpoint(tmp_path / "m.pt", Wrapper(model), {})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_checkpoint_from_before_tta_loads_without_it(tmp_path):
    # models registered before model.tta existed store no such key: they predict as they did
    model = CNN(make_cfg([{"fc": 3}]))
    save_checkpoint(tmp_path / "m.pt", model, {})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    del raw["model_config"]["tta"]
    torch.save(raw, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt")
    assert loaded.cfg.tta == "none"


def test_checkpoint_rejects_non_plain_extra_and_writes_nothing(tmp_path):
    model = CNN(make_cfg([{"fc": 3}]))
    with pytest.raises(TypeError, match=r"^extra\['mean'\]\[0\]: torch.Tensor is not plain python"):
        save_checkpoint(tmp_path / "m.pt", model, {"mean": [torch.tensor(0.5)]})
    assert list(tmp_path.iterdir()) == []


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad.pt: not a readable checkpoint") as e:
        load_checkpoint(bad)
    assert "\n" not in str(e.value)
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not a model checkpoint"):
        load_checkpoint(bad)


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "src.model", *args], cwd=cwd, capture_output=True, text=True
    )


def test_cli_prints_the_table_for_the_repo_params():
    proc = _cli("--params", str(REPO / "params.yaml"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("layer ") and "output h x w x d" in line for line in lines)
    assert any(line.startswith("total ") for line in lines)
    for i in range(len(_repo_layers())):
        assert any(line.startswith(f"{i} ") for line in lines), f"no row for layer {i}"
    assert proc.stderr == ""


def test_cli_bad_spec_is_one_line_and_exit_2(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    i = next(i for i, layer in enumerate(raw["model"]["layers"]) if "pool" in layer)
    raw["model"]["layers"][i]["pool"] = "median"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    proc = _cli("--params", str(params))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: {params}: model.layers[{i}].pool: unknown kind 'median' (expected max, avg, sum)"
    ]
