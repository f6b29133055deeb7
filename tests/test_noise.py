"""The Gaussian noise op of D's layers (sgan/csrc/cpu/noise_cpu.cpp) against references written here: a
Python Philox4x32-10 with Random123's published answers, and Box-Muller of its words."""
from __future__ import annotations

import math

import pytest
import torch

from sgan import ops

needs_cpp = pytest.mark.skipif("cpp" not in ops.available_backends(), reason="the fused CPU op did not build")
MASK = 0xFFFFFFFF


def philox_reference(counter: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    """Philox4x32-10 as Salmon et al. (2011) define it (Random123's philox4x32, 10 rounds)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    return [c0, c1, c2, c3]


def normals_reference(key: int, n: int) -> torch.Tensor:
    """Element i: Box-Muller of the words of counter i // 4 (words 0, 1 for slots 0, 1; words 2, 3 for 2, 3)."""
    out = []
    for c in range((n + 3) // 4):
        w = philox_reference((c & MASK, c >> 32, 0, 0), (key & MASK, key >> 32))
        for u_word, v_word in ((w[0], w[1]), (w[2], w[3])):
            u, v = ((u_word >> 8) + 0.5) / 2**24, (v_word >> 8) / 2**24
            radius = math.sqrt(-2 * math.log(u))
            out += [radius * math.cos(2 * math.pi * v), radius * math.sin(2 * math.pi * v)]
    return torch.tensor(out[:n], dtype=torch.float64)


@needs_cpp
def test_philox_gives_random123s_known_answers_and_matches_the_reference():
    known = [((0, 0, 0, 0), (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
             ((MASK,) * 4, (MASK, MASK), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for counter, key, words in known:
        assert philox_reference(counter, key) == words
        assert torch.ops.sgan._philox(torch.tensor([counter]), *key)[0].tolist() == words
    generator = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (50, 4), generator=generator)
    got = torch.ops.sgan._philox(counters, 0x12345678, 0x9ABCDEF0)
    assert got.tolist() == [philox_reference(tuple(c), (0x12345678, 0x9ABCDEF0)) for c in counters.tolist()]


@needs_cpp
@pytest.mark.parametrize("n", [1, 7, 2048, 5003])  # a partial counter, one block, blocks and a tail
def test_noise_is_box_muller_of_the_philox_words_of_each_elements_counter(n):
    key = 0x0123456789ABCDEF
    x = torch.linspace(-1, 1, n)
    noise = (torch.ops.sgan.add_gaussian_noise(x, 0.5, torch.tensor(key)) - x) / 0.5
    torch.testing.assert_close(noise.double(), normals_reference(key, n), atol=2e-5, rtol=1e-5)


@needs_cpp
def test_noise_is_standard_normal_and_uncorrelated():
    n = 1 << 20
    noise = torch.ops.sgan.add_gaussian_noise(torch.zeros(n), 1.0, torch.tensor(2024)).double()
    assert abs(noise.mean()) < 5 / math.sqrt(n) and abs(noise.std() - 1) < 5e-3
    levels = torch.tensor([0.001, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999], dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).icdf(levels)
    torch.testing.assert_close(torch.quantile(noise, levels), expected, atol=0.03, rtol=0)
    for lag in (1, 2, 4):  # the two normals of a pair, the pairs of a counter, neighbouring counters
        assert abs((noise[lag:] * noise[:-lag]).mean()) < 5 / math.sqrt(n), lag


@needs_cpp
def test_the_same_key_gives_the_same_noise_on_any_thread_count():
    x = torch.randn(300, 1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.sgan.add_gaussian_noise(x, 0.3, torch.tensor(99))
        torch.set_num_threads(2)
        two = torch.ops.sgan.add_gaussian_noise(x, 0.3, torch.tensor(99))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not torch.equal(one, torch.ops.sgan.add_gaussian_noise(x, 0.3, torch.tensor(100)))


@needs_cpp
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_other_dtypes_add_the_same_noise(dtype, tolerance):
    x = torch.randn(64, 33)
    reference = torch.ops.sgan.add_gaussian_noise(x, 0.5, torch.tensor(5))
    got = torch.ops.sgan.add_gaussian_noise(x.to(dtype), 0.5, torch.tensor(5))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), reference, atol=tolerance * 4, rtol=tolerance)


@needs_cpp
def test_a_non_contiguous_input_is_read_in_its_logical_order():
    x = torch.randn(40, 30).t()
    assert torch.equal(torch.ops.sgan.add_gaussian_noise(x, 1.0, torch.tensor(3)),
                       torch.ops.sgan.add_gaussian_noise(x.contiguous(), 1.0, torch.tensor(3)))


@needs_cpp
def test_the_gradient_passes_through_and_opcheck_passes():
    x = torch.randn(8, 5, requires_grad=True)
    upstream = torch.randn(8, 5)
    torch.ops.sgan.add_gaussian_noise(x, 0.7, torch.tensor(11)).backward(upstream)
    assert torch.equal(x.grad, upstream)
    torch.library.opcheck(torch.ops.sgan.add_gaussian_noise.default, (torch.randn(6, 7, requires_grad=True), 0.5, torch.tensor(4)))


@needs_cpp
def test_integer_input_is_a_type_error_and_the_key_must_be_one_int64():
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.sgan.add_gaussian_noise(torch.arange(4), 1.0, torch.tensor(0))
    for key in (torch.tensor(1.0), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="key as one int64 on the CPU"):
            torch.ops.sgan.add_gaussian_noise(torch.zeros(4), 1.0, key)


@needs_cpp
def test_the_wrapper_follows_torch_manual_seed():
    x = torch.zeros(1000)
    torch.manual_seed(7)
    first, second = ops.add_gaussian_noise(x, 1.0), ops.add_gaussian_noise(x, 1.0)
    torch.manual_seed(7)
    assert torch.equal(ops.add_gaussian_noise(x, 1.0), first)
    assert not torch.equal(first, second)  # each call draws a new key


def test_the_wrapper_falls_back_to_torch_where_the_op_does_not_run(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "torch")  # as when the op cannot run, or on CUDA
    x = torch.randn(100)
    torch.manual_seed(3)
    got = ops.add_gaussian_noise(x, 0.25)
    torch.manual_seed(3)
    torch.testing.assert_close(got, x + 0.25 * torch.randn(100))
