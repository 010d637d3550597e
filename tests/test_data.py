import shutil
from collections import Counter

import pytest

from styleshift.data import DataError, PairSampler, find_training_images


def test_an_epoch_walks_the_larger_domain_and_draws_the_other():
    sampler = PairSampler(len_A=3, len_B=7, seed=0)
    sampler.set_epoch(0)
    items = list(sampler)
    assert len(items) == 7
    assert sorted(b for _, b, _ in items) == list(range(7))  # every style image once
    assert all(0 <= a < 3 for a, _, _ in items)
    sampler.set_epoch(1)
    assert [b for _, b, _ in sampler] != [b for _, b, _ in items]  # reshuffled each epoch


def test_sampling_is_deterministic_and_resumes_mid_epoch():
    s1, s2 = PairSampler(5, 4, seed=3), PairSampler(5, 4, seed=3)
    s1.set_epoch(2)
    s2.set_epoch(2, start=3)
    assert list(s2) == list(s1)[3:]


def test_ranks_take_disjoint_shares_of_an_epoch():
    shares = []
    for rank in range(2):
        s = PairSampler(9, 4, seed=0, rank=rank, world_size=2)
        s.set_epoch(0)
        shares.append([a for a, _, _ in s])
    assert len(shares[0]) == len(shares[1]) == 4  # equal steps on every rank (remainder dropped)
    assert not set(shares[0]) & set(shares[1])


def test_files_that_are_not_pictures_are_skipped_with_a_warning(tmp_path, sample_dirs):
    photos, _ = sample_dirs
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder / "sub")
    (folder / "notes.jpg").write_text("not a picture")
    (folder / "empty.png").write_bytes(b"")
    (folder / "._hidden.jpg").write_bytes(b"\0\0")  # a macOS companion file: silently ignored
    (folder / "readme.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning) as caught:
        files = find_training_images(folder, "content")
    assert len(files) == 4
    messages = " ".join(str(w.message) for w in caught)
    assert "notes.jpg" in messages and "empty.png" in messages and "hidden" not in messages


def test_a_folder_without_a_usable_picture_is_a_clear_error(tmp_path):
    (tmp_path / "bad.jpg").write_text("nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable image"):
        find_training_images(tmp_path, "style")
    with pytest.raises(DataError, match="not found"):
        find_training_images(tmp_path / "missing", "style")


def test_a_picture_that_fails_to_decode_later_is_replaced_not_fatal(tmp_path, sample_dirs):
    from styleshift.data import DomainImages

    photos, _ = sample_dirs
    files = sorted(photos.iterdir())[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(files[0].read_bytes()[:3000])  # header intact, data cut off
    images = DomainImages([broken, files[1]], load_size=40)
    with pytest.warns(UserWarning, match="broken.jpg"):
        image = images[0]
    assert min(image.shape[:2]) == 40
    assert Counter(images.bad) == Counter({0: 1})
