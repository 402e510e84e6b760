"""Tests of the models room: early-exit networks, their options and their MACs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.flop_counter import FlopCounterMode

from cafedist.algorithms.common import is_head
from cafedist.errors import ConfigError
from cafedist.models import ARCHS, EarlyExitNet, arch_options, build_model, macs_per_exit
from cafedist.models.macs import macs_breakdown

NUM_CLASSES = 5
TINY_TEXT = {"vocab_size": 50, "d_model": 16, "heads": 2, "ff": 32}
# (arch, input_shape, options, expected number of exits); tiny widths keep the tests fast.
CASES = [
    ("cnn", (3, 32, 32), {"width": 4}, 3),
    ("cnn", (1, 28, 28), {"width": 4}, 3),
    ("cnn", (1, 8, 8), {"width": 4}, 3),
    ("cnn", (1, 8, 8), {"width": 4, "head_conv": False}, 3),
    ("cnn", (1, 3, 3), {"width": 4}, 3),  # pooling skipped once the map is 1x1
    ("resnet18", (3, 32, 32), {"width": 4}, 4),
    ("resnet18", (3, 64, 64), {"width": 4, "norm": "batch"}, 4),
    ("resnet18", (1, 8, 8), {"width": 4}, 4),  # 1x1 maps at the end: GroupNorm groups of >= 16 values
    ("transformer", (12,), TINY_TEXT, 4),
    ("transformer", (12,), {**TINY_TEXT, "layers": 2}, 2),
]
IDS = [f"{a}-{'x'.join(map(str, s))}-{i}" for i, (a, s, _, _) in enumerate(CASES)]


def make_input(model: EarlyExitNet, shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    """A deterministic batch: images ~ N(0, 1), or token ids with trailing padding."""
    g = torch.Generator().manual_seed(123)
    if model.input_dtype == torch.long:
        ids = torch.randint(1, TINY_TEXT["vocab_size"], (batch, *shape), generator=g)
        ids[0, shape[0] // 2:] = 0  # first sequence half padding
        return ids
    return torch.randn((batch, *shape), generator=g)


def build(arch: str, shape: tuple[int, ...], opts: dict, seed: int = 0) -> EarlyExitNet:
    torch.manual_seed(seed)
    return build_model(arch, shape, NUM_CLASSES, **opts)


@pytest.mark.parametrize("arch,shape,opts,m", CASES, ids=IDS)
def test_forward_shapes(arch, shape, opts, m):
    model = build(arch, shape, opts)
    assert model.num_exits == m == len(model.blocks) == len(model.heads)
    outs = model(make_input(model, shape))
    assert len(outs) == m
    for out in outs:
        assert out.shape == (2, NUM_CLASSES)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch,shape,opts,m", CASES, ids=IDS)
def test_upto_runs_only_needed_blocks(arch, shape, opts, m):
    model = build(arch, shape, opts).eval()  # eval: dropout off, so outputs are comparable
    x = make_input(model, shape)
    full = model(x)
    calls: list[str] = []
    for name, parts in (("block", model.blocks), ("head", model.heads)):
        for k, part in enumerate(parts):
            part.register_forward_hook(lambda *_, tag=f"{name}{k}": calls.append(tag))
    for k in range(1, m + 1):
        calls.clear()
        outs = model(x, upto=k)
        assert len(outs) == k
        for a, b in zip(outs, full[:k]):
            torch.testing.assert_close(a, b)
        assert sorted(calls) == sorted([f"block{i}" for i in range(k)] +
                                       [f"head{i}" for i in range(k)])


def test_upto_out_of_range_is_rejected():
    model = build("cnn", (1, 8, 8), {"width": 2})
    x = make_input(model, (1, 8, 8))
    for bad in (0, 4, -1, True, 1.0):
        with pytest.raises(ValueError, match="upto"):
            model(x, upto=bad)


def test_iter_exits_is_lazy():
    model = build("cnn", (1, 8, 8), {"width": 2})
    ran: list[int] = []
    for k, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, k=k: ran.append(k))
    first = next(model.iter_exits(make_input(model, (1, 8, 8))))
    assert first.shape == (2, NUM_CLASSES) and ran == [0]


@pytest.mark.parametrize("arch,shape,opts,m", CASES, ids=IDS)
def test_macs_match_flop_counter(arch, shape, opts, m):
    model = build(arch, shape, opts).eval()
    macs = macs_per_exit(model, shape)
    assert len(macs) == m
    assert all(0 < a < b for a, b in zip(macs, macs[1:]))  # every block adds work
    x = make_input(model, shape, batch=2)
    for k in range(1, m + 1):
        with FlopCounterMode(display=False) as counter:
            model(x, upto=k)
        # Same convention (conv/linear/matmul only), so the match is exact: flops = 2 x MACs,
        # and the batch of 2 doubles it again.
        assert counter.get_total_flops() == 2 * 2 * macs[k - 1], f"exit {k}"


def test_macs_by_hand_for_a_tiny_cnn():
    # width 2, no head convs, 1x4x4 input, C=5: block k = H*W*(c_in*9)*c_out at its own
    # resolution (pooling comes after the conv); head k = Linear(c_k, 5).
    model = build("cnn", (1, 4, 4), {"width": 2, "head_conv": False})
    blocks = [16 * 9 * 1 * 2, 4 * 9 * 2 * 4, 1 * 9 * 4 * 8]
    heads = [2 * 5, 4 * 5, 8 * 5]
    assert macs_breakdown(model, (1, 4, 4)) == (blocks, heads)
    assert macs_per_exit(model, (1, 4, 4)) == [
        blocks[0] + heads[0],
        blocks[0] + heads[0] + blocks[1] + heads[1],
        sum(blocks) + sum(heads),
    ]


def test_macs_by_hand_for_a_tiny_cnn_with_head_convs():
    # 1x4x4, width 2: blocks read 4x4, 2x2, 1x1 (no pooling below 2). Head conv k (c_k -> c_k,
    # 3x3) has stride 2 on the 2x2 map (1x1 out) and 1 on the 1x1 one; the last head has none.
    model = build("cnn", (1, 4, 4), {"width": 2, "head_conv": True})
    blocks = [16 * 9 * 1 * 2, 4 * 9 * 2 * 4, 1 * 9 * 4 * 8]
    heads = [1 * 9 * 2 * 2 + 2 * 5, 1 * 9 * 4 * 4 + 4 * 5, 8 * 5]
    assert macs_breakdown(model, (1, 4, 4)) == (blocks, heads)


def test_macs_leave_batchnorm_state_and_mode_alone():
    model = build("resnet18", (3, 8, 8), {"width": 2, "norm": "batch"})
    before = copy.deepcopy(model.state_dict())
    macs_per_exit(model, (3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # Larger input, more work: the count follows the given input shape.
    assert macs_per_exit(model, (3, 16, 16))[-1] > macs_per_exit(model, (3, 8, 8))[-1]
    model.eval()  # and a model in eval mode stays there (bench times and exports it after counting)
    macs_per_exit(model, (3, 8, 8))
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("arch,shape,opts,m", CASES[::2], ids=IDS[::2])
def test_body_and_head_parameters_partition_all(arch, shape, opts, m):
    model = build(arch, shape, opts)
    body = {id(p) for p in model.blocks.parameters()}
    head = {id(p) for p in model.heads.parameters()}
    assert body and head and not body & head
    assert body | head == {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():
        assert is_head(name) == (id(p) in head), name  # the one head test of the algorithms
    keys = model.state_dict().keys()
    assert all(k.startswith(("blocks.", "heads.")) for k in keys)
    assert not is_head("blocks.0.heads.weight") and is_head("heads.2.0.weight", 2)


@pytest.mark.parametrize("arch,shape,opts,m", CASES[::2], ids=IDS[::2])
def test_same_seed_same_model(arch, shape, opts, m):
    a, b, c = build(arch, shape, opts, 7), build(arch, shape, opts, 7), build(arch, shape, opts, 8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_cnn_overfits_random_labels_at_every_exit():
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, width=8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        loss = sum(F.cross_entropy(out, y) for out in model(x))
        opt.zero_grad()
        loss.backward()
        if step == 0:  # every parameter, of every block and every head, receives gradient
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    with torch.no_grad():
        accs = [(out.argmax(1) == y).float().mean().item() for out in model(x)]
    assert all(acc == 1.0 for acc in accs), accs


def test_transformer_ignores_padding():
    model = build("transformer", (12,), TINY_TEXT).eval()
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    ids[1, 4:] = 0
    short = model(ids)
    padded = model(torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1))
    for a, b in zip(short, padded):
        torch.testing.assert_close(a, b)
    all_pad = model(torch.zeros(1, 12, dtype=torch.long))
    assert all(torch.isfinite(out).all() for out in all_pad)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 13, dtype=torch.long))


@pytest.mark.parametrize("arch,shape,opts,m", [CASES[2], CASES[5], CASES[7]],
                         ids=[IDS[2], IDS[5], IDS[7]])
def test_models_stack_under_vmap(arch, shape, opts, m):
    # The trainer stacks client models with torch.func; group norm / no norm allow it.
    models = [build(arch, shape, opts, seed).eval() for seed in range(3)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x = make_input(models[0], shape)

    def run(p, b, inp):
        return tuple(functional_call(skeleton, (p, b), (inp,)))

    stacked = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for i, model in enumerate(models):
        for out, ref in zip(stacked, model(x)):
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-4)


def test_archs_and_defaults():
    assert ARCHS == ("cnn", "resnet18", "transformer")
    assert arch_options("cnn") == {"width": 32, "head_conv": True}
    assert arch_options("resnet18")["norm"] == "group"
    assert arch_options("transformer")["vocab_size"] is None
    resnet = build_model("resnet18", (3, 32, 32), 10)  # default width 64 -> 512 at the end
    assert resnet.heads[-1][-1].in_features == 512
    assert isinstance(resnet.blocks[0][0][1], torch.nn.GroupNorm)
    cnn = build_model("cnn", (3, 32, 32), 10)
    assert [h[-1].in_features for h in cnn.heads] == [32, 64, 128]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in cnn.modules())


@pytest.mark.parametrize("arch,shape,num_classes,opts,fragments", [
    ("vgg", (3, 32, 32), 10, {}, ["model.arch", "'vgg'", "cnn, resnet18, transformer"]),
    ("cnn", (3, 32, 32), 10, {"depth": 3}, ["model.options.depth", "width, head_conv"]),
    ("cnn", (3, 32, 32), 10, {"width": "wide"}, ["model.options.width", "int"]),
    ("cnn", (3, 32, 32), 10, {"width": True}, ["model.options.width", "int"]),
    ("cnn", (3, 32, 32), 10, {"width": 0}, ["model.options.width", ">= 1"]),
    ("cnn", (3, 32, 32), 10, {"head_conv": 1}, ["model.options.head_conv", "bool"]),
    ("resnet18", (3, 32, 32), 10, {"norm": "layer"}, ["model.options.norm", "'group'", "'batch'"]),
    ("transformer", (16,), 4, {}, ["model.options.vocab_size", "required"]),
    ("transformer", (16,), 4, {"vocab_size": 10, "d_model": 10, "heads": 4},
     ["model.options.d_model", "multiple of heads=4"]),
    ("transformer", (16,), 4, {"vocab_size": 10, "dropout": 1.0}, ["model.options.dropout"]),
    ("cnn", (32, 32), 10, {}, ["model.arch='cnn'", "(channels, height, width)"]),
    ("transformer", (3, 16), 4, {"vocab_size": 10}, ["(sequence_length,)"]),
    ("transformer", (1, 8, 8), 10, {},
     ["model.arch='transformer'", "text datasets", "image samples", "cnn or resnet18"]),
    ("cnn", (64,), 4, {}, ["model.arch='cnn'", "image datasets", "text samples", "use transformer"]),
    ("cnn", (3, 32.5, 32), 10, {}, ["input shape", "integers"]),
    ("cnn", (3, 32, 32), 1, {}, ["classes", ">= 2"]),
])
def test_bad_config_is_one_line_config_error(arch, shape, num_classes, opts, fragments):
    with pytest.raises(ConfigError) as info:
        build_model(arch, shape, num_classes, **opts)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_float_option_accepts_int_and_numpy_shapes():
    np = pytest.importorskip("numpy")
    model = build_model("transformer", (np.int64(8),), 3, vocab_size=20, d_model=8, heads=2,
                        ff=8, layers=1, dropout=0)
    assert model.input_shape == (8,) and model.num_exits == 1


@pytest.mark.parametrize("channels,spatial,groups", [
    (64, 8, 32), (512, 4, 32), (24, 8, 8), (12, 8, 4), (32, 8, 16), (16, 8, 8), (4, 8, 2), (2, 8, 1), (1, 8, 1),
    # small maps: at least 16 values a group (a ResNet's deep stages and heads on 8x8 inputs)
    (64, 2, 16), (128, 1, 8), (64, 1, 4), (256, 4, 32), (8, 1, 1)])
def test_group_norm_keeps_32_groups_unless_a_group_would_hold_one_channel_or_few_values(channels, spatial, groups):
    from cafedist.models.layers import group_norm

    assert group_norm(channels, spatial).num_groups == groups


def test_a_resnet_exit_on_a_1x1_map_keeps_more_than_which_channel_is_larger():
    """On 8x8 inputs exit 3's head normalises a 1x1 map: with groups of two channels every
    feature came out as 0 or 1 (which of two channels is larger), and the exit trained to 50-60 %
    on digits where the exits beside it reached 95 %."""
    torch.manual_seed(0)
    net = build_model("resnet18", (1, 8, 8), 10, width=16)
    h = torch.randn(16, 1, 8, 8)
    for block in net.blocks[:3]:
        h = block(h)
    features = net.heads[2][:3](h).detach()  # conv -> norm -> ReLU of exit 3's head
    assert features.shape[-2:] == (1, 1)
    assert len(torch.unique(features.round(decimals=3))) > 100
