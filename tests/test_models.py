"""The networks at every supported image size: shapes, the size rules their docstrings state, bounded parameter
counts, the error for other sizes, data-dependent init, and bit-identical networks at the published sizes."""
import hashlib

import pytest
import torch
from torch import nn

from sgan.losses import num_logits
from sgan.models import (SUPPORTED_SIZES, NetworkSpec, SalimansConvDiscriminator, SalimansConvGenerator, WNConv2d,
                         WNLinear, build_discriminator, build_generator, softplus)

FAMILIES = ("odena", "salimans")
REQUIRED_SIZES = (28, 32, 48, 64, 96, 128)  # issue 11's "at least"
LISTING = "12, 16, 24, 28, 32, 48, 56, 64, 96, 112, 128, 192, 224 or 256"
PARAMETER_BOUND = 10_000_000  # D's and G's each, default widths, at every supported size


def narrow(family: str, channels: int, size: int) -> NetworkSpec:
    """Narrow networks, so forward passes at 128x128 stay fast (the size rules do not depend on the widths).
    g_output="sigmoid": the MLP G's paper output, in [-1, 1] (the default softplus is unbounded above)."""
    return NetworkSpec(family, (channels, size, size), 10, "k-plus-one", d_width=4, g_width=4,
                       salimans_conv_widths=(8, 16), g_output="sigmoid")


def test_supported_sizes_include_the_required_ones_and_test_steps_12():
    assert set(REQUIRED_SIZES) | {12} <= set(SUPPORTED_SIZES)
    assert ", ".join(map(str, SUPPORTED_SIZES)) == LISTING.replace(" or", ",")


@pytest.mark.parametrize("size", REQUIRED_SIZES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_d_maps_images_to_logits_and_g_noise_to_images(family, channels, size):
    torch.manual_seed(0)
    spec = narrow(family, channels, size)
    d, g = build_discriminator(spec), build_generator(spec)
    images = g(g.sample_latent(3, "cpu"))
    assert images.shape == (3, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert d(images).shape == (3, num_logits("k-plus-one", 10))
    features = d.features(images)
    assert features.dim() == 2 and len(features) == 3


def map_sides(network: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, int, int]]:
    """(conv, input side, output side) for every conv of D, in forward order."""
    sides = []
    hooks = [m.register_forward_hook(lambda m, i, o: sides.append((m, i[0].shape[-1], o.shape[-1])))
             for m in network.modules() if isinstance(m, (nn.Conv2d, WNConv2d))]
    with torch.no_grad():
        network(x)
    for hook in hooks:
        hook.remove()
    return sides


# side: (odena D's last map, odena G's start map, salimans D's map before its valid conv, salimans G's start map)
RULES = {12: (3, 6, 6, 3), 28: (4, 7, 7, 7), 32: (4, 8, 8, 4), 48: (3, 6, 6, 3), 64: (4, 8, 8, 4),
         96: (3, 6, 6, 3), 128: (4, 8, 8, 4), 224: (4, 7, 7, 7)}


@pytest.mark.parametrize("size", RULES)
def test_stride_2_stages_follow_the_documented_rules(size):
    odena_d_end, odena_g_start, salimans_d_end, salimans_g_start = RULES[size]
    x = torch.zeros(2, 3, size, size)
    odena, salimans = narrow("odena", 3, size), narrow("salimans", 3, size)
    assert map_sides(build_discriminator(odena), x)[-1][2] == odena_d_end
    valid_conv_inputs = [side for m, side, _ in map_sides(build_discriminator(salimans), x)
                         if isinstance(m, WNConv2d) and m.kernel_size == 3 and m.padding == 0]
    assert valid_conv_inputs == [salimans_d_end]
    assert build_generator(odena).start == odena_g_start
    assert build_generator(salimans).start == salimans_g_start


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_stay_bounded_at_every_size(family):
    """Before the sizing, the odena G's linear layer alone had 40M weights at 224x224."""
    for size in SUPPORTED_SIZES:
        spec = NetworkSpec(family, (3, size, size), 10, "k-logit")
        for network in (build_discriminator(spec), build_generator(spec)):
            count = sum(p.numel() for p in network.parameters())
            assert count < PARAMETER_BOUND, (family, size, type(network).__name__, count)


@pytest.mark.parametrize("shape", [(3, 30, 30), (1, 20, 20), (3, 100, 100), (1, 8, 8), (3, 512, 512),
                                   (1, 28, 32)])
@pytest.mark.parametrize("family", FAMILIES)
def test_unsupported_sizes_get_an_error_listing_the_supported_ones(family, shape):
    spec = NetworkSpec(family, shape, 10, "k-logit")
    expected = rf"square images of side {LISTING} .*not {shape[1]}x{shape[2]}: use --image-size with one of them"
    for build in (build_discriminator, build_generator):
        with pytest.raises(ValueError, match=expected):
            build(spec)


@pytest.mark.parametrize("family", FAMILIES)
def test_channels_other_than_1_or_3_are_refused(family):
    spec = NetworkSpec(family, (4, 32, 32), 10, "k-logit")
    for build in (build_discriminator, build_generator):
        with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\) channels, not 4: use --channels 1 or 3"):
            build(spec)


@pytest.mark.parametrize("size, stages", [(32, 2), (48, 3), (64, 3)])
def test_conv_discriminator_init_standardises_every_layer(size, stages):
    """Data-dependent init: each weight-normalised layer's pre-activations have mean 0 and std 1 (0.1 for the
    logits) on the batch it was initialised on (dropout off, so the check sees that batch's activations)."""
    torch.manual_seed(0)
    d = SalimansConvDiscriminator(10, input_dropout=0.0, dropout=0.0, widths=(16, 32), image_size=size)
    x = torch.rand(16, 3, size, size) * 2 - 1
    d.init_from_batch(x)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append((m, o))) for m in d.modules()
             if isinstance(m, WNConv2d) or m is d.head]
    with torch.no_grad():
        d(x)
    for hook in hooks:
        hook.remove()
    assert len(outputs) == 3 * stages + 3 + 1  # three convs per stage, the valid and 1x1 convs, the head
    for module, y in outputs:
        per_channel = y.transpose(0, 1).flatten(1)
        assert per_channel.mean(1).abs().max() < 1e-4, module
        torch.testing.assert_close(per_channel.std(1), torch.full((len(per_channel),), module.init_scale),
                                   atol=1e-3, rtol=0)
    assert "g" not in dict(d.layers[1].named_parameters()) and d.head.g.requires_grad  # as in the paper

    g = SalimansConvGenerator(image_shape=(3, size, size))
    g.init_from_batch(g.sample_latent(8, "cpu"))
    with torch.no_grad():
        pre_tanh = g.out(g._hidden(g.sample_latent(8, "cpu")))
    assert pre_tanh.shape == (8, 3, size, size)
    assert 0.05 < pre_tanh.std().item() < 0.2  # init_scale 0.1 (fresh noise, so not exact)


# ----------------------------------------------------------------------------- the published sizes, unchanged


def digest(module: nn.Module) -> str:
    """sha256 of a state dict: its keys, dtypes, shapes and values, in order."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(f"{key} {value.dtype} {tuple(value.shape)};".encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# Made with the networks before they were sized for the images (commit 9e652e4's sgan/models.py): for each spec,
# torch.manual_seed(0) then build_discriminator, torch.manual_seed(0) then build_generator, digest() of each;
# torch 2.14.1 on an x86-64 CPU. (family, image_shape, formulation, other spec fields): (D's, G's).
PUBLISHED = {
    ("odena", (1, 28, 28), "k-logit", ()): ("fbd3b6bc74f30407", "c9efa08f0ea68e4d"),
    ("odena", (1, 28, 28), "two-head", (("d_batchnorm", False),)): ("4558ca8325e7ff5e", "c9efa08f0ea68e4d"),
    ("odena", (1, 32, 32), "k-plus-one", ()): ("ff3410ed7ac8df63", "4e7b4219256bc32e"),
    ("odena", (3, 32, 32), "k-logit", ()): ("2d244254d53468e3", "7c3129a904f57a34"),
    ("odena", (3, 32, 32), "two-head", (("d_width", 64), ("g_width", 48), ("latent_dim", 64))):
        ("fba04989b9383a2d", "815e6c8dfa41098f"),
    ("salimans", (1, 28, 28), "k-logit", ()): ("2960aa8fa796fbbc", "da27d6fa0d231766"),
    ("salimans", (1, 28, 28), "two-head", (("latent_dim", 50),)): ("55a0b573dbf51def", "a9f204030d89bc6a"),
    ("salimans", (1, 32, 32), "k-logit", ()): ("b27ef0418ba3322a", "033602691e69a64e"),
    ("salimans", (3, 32, 32), "k-logit", ()): ("91bebffb19c9d0eb", "9c050593863e1d0a"),
    ("salimans", (3, 32, 32), "k-plus-one", (("salimans_conv_widths", (64, 128)),)):
        ("1b3dd07444b8c6e7", "9c050593863e1d0a"),
}


# torch's normal_ runs one vectorised kernel on AVX2 and AVX512 CPUs and another elsewhere: their floats differ
# in the last bits, so the pinned values hold only where they were made
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the pinned values were drawn by torch's AVX2/AVX512 normal_ kernel")
@pytest.mark.parametrize("case", PUBLISHED)
def test_networks_at_the_published_sizes_are_bit_identical(case):
    family, shape, formulation, changes = case
    spec = NetworkSpec(family, shape, 10, formulation, **dict(changes))
    torch.manual_seed(0)
    d = build_discriminator(spec)
    torch.manual_seed(0)
    g = build_generator(spec)
    assert (digest(d), digest(g)) == PUBLISHED[case]


def test_weight_normalised_linear_is_x_times_g_v_over_norm_v_and_so_is_its_gradient():
    """The layer scales x v^T per output instead of building W = g v / ||v||: the same value and gradients."""
    torch.manual_seed(0)
    layer = WNLinear(7, 5).double()  # float64: the two orders of operations agree to rounding
    with torch.no_grad():
        layer.g.uniform_(0.5, 2.0)
        layer.b.uniform_(-1.0, 1.0)
    x = torch.randn(4, 7, dtype=torch.float64)
    weight = layer.g.unsqueeze(1) * layer.v / layer.v.norm(dim=1, keepdim=True)
    reference = torch.nn.functional.linear(x, weight, layer.b)
    torch.testing.assert_close(layer(x), reference)
    expected = torch.autograd.grad(reference.square().sum(), [layer.v, layer.g, layer.b])
    torch.testing.assert_close(torch.autograd.grad(layer(x).square().sum(), [layer.v, layer.g, layer.b]), expected)


def test_softplus_matches_torch_in_value_and_gradient_far_out_too():
    x = torch.tensor([-200.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 200.0], requires_grad=True)
    torch.testing.assert_close(softplus(x), nn.functional.softplus(x))
    mine = torch.autograd.grad(softplus(x).sum(), x)[0]
    torch.testing.assert_close(mine, torch.sigmoid(x.detach()))  # d/dx log(1 + e^x)


def test_odena_d_features_are_a_stage_output_flattened():
    from sgan.models import Discriminator, NetworkSpec, check_feature_layer

    torch.manual_seed(0)
    d = Discriminator(10, "k-logit").eval()  # 28 -> 14 -> 7 -> 4: three stages
    images = torch.randn(2, 1, 28, 28)
    assert d.hidden_layer_count == 3
    torch.testing.assert_close(d.features(images), d.body(images))  # what the head sees
    torch.testing.assert_close(d.features(images, -2), d.body[:6](images).flatten(1))
    assert d.features(images, -3).shape == (2, 32 * 14 * 14)
    with pytest.raises(ValueError, match="this D has 3 hidden layers"):
        check_feature_layer(NetworkSpec("odena", (1, 28, 28), 10, "k-logit"), -4)
