"""The CUDA kernel's division-free arithmetic (kernels/perturb.cu), replayed
on CPU in the same IEEE operations, against the spec's divisions.

- uint8 x / 255 is q = x * RN(1/255) corrected by one FMA residual step;
- (v - mean) / std is RN32(double(v - mean) * RN64(1 / std)) on GPUs with
  fast fp64.

Both must give the correctly rounded float32 quotient bit for bit, as the
spec's float32 divisions do. The GPU tests check the kernel itself against
the reference; these pin the arithmetic down where no GPU is.
"""
from fractions import Fraction

import numpy as np

from freeadv_fast.data import DATASETS

F32 = np.float32


def rn32(value: Fraction) -> np.float32:
    """A rational rounded to the nearest float32, ties to even (exactly:
    float() may round twice, so the neighbours are compared)."""
    d = F32(float(value))
    best = None
    for c in (np.nextafter(d, F32(-np.inf)), d, np.nextafter(d, F32(np.inf))):
        err = abs(Fraction(float(c)) - value)
        even = int(np.array(c, F32).view(np.uint32)) % 2 == 0
        if best is None or err < best[0] or (err == best[0] and even):
            best = (err, c)
    return best[1]


def fma32(a, b, c) -> np.float32:
    return rn32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def test_uint8_over_255_by_multiply_and_fma_is_exact_for_every_value():
    inv = F32(1.0) / F32(255.0)  # the kernel's constexpr 1.0f / 255.0f, correctly rounded
    assert inv == rn32(Fraction(1, 255))
    for x in range(256):
        xf = F32(x)
        q = F32(xf * inv)
        got = fma32(fma32(-q, F32(255.0), xf), inv, q)
        assert got == xf / F32(255.0), x


def f64_division(n: np.ndarray, std: float) -> np.ndarray:
    """What the kernel computes for n / std: float32 n widened, times the
    double reciprocal of the float32 std, rounded to float32."""
    inv = np.float64(1.0) / np.float64(F32(std))
    return (n.astype(np.float64) * inv).astype(F32)


def hard_numerators(std: np.float32, count: int, rng) -> np.ndarray:
    """Numerators whose quotient lies as near a float32 rounding midpoint as
    float32 allows: RN32(m * std) for midpoints m of random quotients, and
    their neighbours."""
    q = rng.uniform(-3, 3, count).astype(F32)
    mid = q.astype(np.float64) + (np.nextafter(q, F32(np.inf)).astype(np.float64) - q) / 2
    n = (mid * np.float64(std)).astype(F32)
    return np.concatenate([n, np.nextafter(n, F32(np.inf)), np.nextafter(n, F32(-np.inf))])


def test_normalising_by_the_fp64_reciprocal_is_the_correctly_rounded_quotient():
    rng = np.random.default_rng(0)
    stds = {F32(s) for spec in DATASETS.values() for s in spec.std}
    stds |= set(rng.uniform(0.01, 4.0, 200).astype(F32)) | {F32(1.0), F32(0.5), F32(3.0)}
    for std in sorted(stds):
        n = np.concatenate([
            rng.uniform(-3, 3, 20_000).astype(F32),  # normalised pixels and beyond
            (rng.uniform(0, 1, 20_000).astype(F32) - F32(0.45)),  # v - mean as training makes it
            hard_numerators(std, 5_000, rng),
            np.array([0.0, -0.0, 1e-30, -1e-30, 1e-40, 3e38], F32),  # zeros, tiny, subnormal, huge
        ])
        with np.errstate(over="ignore"):
            want = n / std
            got = f64_division(n, std)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), std
