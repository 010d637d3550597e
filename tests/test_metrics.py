"""The offline SWD and cycle measures, on the real sample images (64 px centre crops, to stay fast)."""

import pytest
import torch

from conftest import SAMPLE
from styleshift.evaluate import load_images
from styleshift.metrics import (SlicedWasserstein, cycle_scores, laplacian_pyramid, pyramid_up, swd,
                                wasserstein_1d)


@pytest.fixture(scope="module")
def sets():
    photos = load_images(SAMPLE / "photos", 64)
    paintings = load_images(SAMPLE / "paintings", 64)
    return photos, paintings[0::2], paintings[1::2]  # the halves alternate names, so they mix the painters


def test_same_set_is_near_zero_and_its_halves_well_below_photos_against_paintings(sets):
    photos, half_a, half_b = sets
    to_b = SlicedWasserstein(half_b)
    same = swd(half_b, half_b).mean  # the same images, other random patches: only sampling noise
    halves = to_b.distance(half_a).mean  # the same-domain floor at this set size
    cross = to_b.distance(photos).mean
    assert same < 0.3 * cross
    assert same < halves < 0.75 * cross


def test_a_growing_colour_cast_gives_a_growing_swd_unless_each_set_is_normalised_alone(sets):
    _, half_a, half_b = sets
    to_b, per_set = SlicedWasserstein(half_b), SlicedWasserstein(half_b, normalize="per-set")
    shifted = []
    for red in (0, 30, 90):
        x = half_a.int()
        x[:, 0] += red
        shifted.append(x.clamp(0, 255).to(torch.uint8))
    means = [to_b.distance(x).mean for x in shifted]
    assert all(a < b for a, b in zip(means, means[1:])) and means[-1] > 2 * means[0]
    # The paper's per-set normalisation removes a global cast: the reason "target" is the default.
    per_set_means = [per_set.distance(x).mean for x in (shifted[0], shifted[-1])]
    assert max(per_set_means) - min(per_set_means) < 0.15 * per_set_means[0]


def test_same_seed_same_number_another_seed_another_draw(sets):
    photos, _, half_b = sets
    photos, half_b = photos[:8], half_b[:8]
    first, again = swd(photos, half_b, seed=3), swd(photos, half_b, seed=3)
    assert first.levels == again.levels
    assert swd(photos, half_b, seed=4).levels != first.levels
    assert first.resolutions == [64, 32, 16] and len(first.to_dict()["levels"]) == 3


def test_laplacian_pyramid_has_the_documented_levels_and_collapses_back_to_the_image(sets):
    x = sets[0][:2].float() / 255
    assert len(laplacian_pyramid(torch.zeros(1, 3, 256, 256))) == 5
    levels = laplacian_pyramid(x)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + pyramid_up(rebuilt, band.shape[-2:])
    assert torch.allclose(rebuilt, x, atol=1e-5)
    assert levels[0].abs().mean() < 0.1 < levels[-1].mean()  # band-pass around 0, the residual keeps the colour


def test_one_dimensional_wasserstein_is_exact_for_sets_of_different_sizes():
    a = torch.tensor([[0.0, 1.0, 3.0]])
    b = torch.tensor([[0.5, 2.0]])
    # Repeating every sample leaves a distribution, hence its distance, unchanged.
    assert torch.allclose(wasserstein_1d(a, b), wasserstein_1d(a.repeat_interleave(2, 1), b.repeat_interleave(3, 1)))
    # By hand: quantiles of a on thirds, of b on halves -> |0-0.5|/3 + |1-0.5|/6 + |1-2|/6 + |3-2|/3.
    assert wasserstein_1d(a, b).item() == pytest.approx(0.5 / 3 + 0.5 / 6 + 1 / 6 + 1 / 3)


def test_cycle_scores_reward_a_faithful_reconstruction(sets):
    x = sets[0][:3].float() / 255
    perfect_psnr, perfect_ssim = cycle_scores(x, x)
    noise = 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    noisy_psnr, noisy_ssim = cycle_scores(x, x + noise)
    assert all(s == pytest.approx(1.0, abs=1e-4) for s in perfect_ssim)
    assert all(p > 60 for p in perfect_psnr)
    assert all(24 < p < 28 for p in noisy_psnr) and all(s < 0.95 for s in noisy_ssim)
