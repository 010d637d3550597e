"""The style library, the shipped default style, and --style by name (styleshift.styles)."""

import errno
import os
import shutil
from datetime import datetime, timedelta, timezone

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import PHOTOS, SAMPLE, TINY_CLI
from styleshift import styles
from styleshift.checkpoint import load_style
from styleshift.cli import main
from styleshift.stylizer import Stylizer


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def small_photo(path):
    with Image.open(PHOTOS[0]) as im:
        im.convert("RGB").resize((40, 30)).save(path)
    return path


@pytest.fixture
def shipped(tiny_style, monkeypatch):
    """The tiny test style stands in for the one shipped in the package (made by a long training run)."""
    monkeypatch.setattr(styles, "shipped_style_file", lambda: tiny_style)
    return tiny_style


def test_the_library_is_in_the_per_user_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert styles.user_data_dir("linux") == tmp_path / ".local" / "share" / "styleshift"
    monkeypatch.setenv("XDG_DATA_HOME", "relative")  # ignored, as the XDG spec says
    assert styles.user_data_dir("linux") == tmp_path / ".local" / "share" / "styleshift"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert styles.user_data_dir("linux") == tmp_path / "xdg" / "styleshift"
    assert styles.user_data_dir("darwin") == tmp_path / "Library" / "Application Support" / "styleshift"
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert styles.user_data_dir("win32") == tmp_path / "Local" / "styleshift"

    monkeypatch.setenv("STYLESHIFT_HOME", str(tmp_path / "home"))
    assert styles.library_dir() == tmp_path / "home" / "styles"
    monkeypatch.delenv("STYLESHIFT_HOME")
    assert styles.library_dir() == styles.user_data_dir() / "styles"


@pytest.mark.parametrize("name", ["mine", "Monet-1874_v2.1", "a" * 64])
def test_valid_names(name):
    assert styles.check_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a/b", "a\\b", "with space", "é", "a" * 65])
def test_invalid_names_are_refused_clearly(name):
    with pytest.raises(styles.StyleError, match="invalid style name.*letters, digits"):
        styles.check_name(name)


def test_train_registers_its_style_and_apply_finds_it_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("STYLESHIFT_RUNS", str(tmp_path / "runs"))
    code, out = run_cli("train", SAMPLE / "photos", SAMPLE / "paintings", "--name", "mine", "--steps", "2",
                        *TINY_CLI)
    assert code == 0, out
    registered = styles.library_dir() / "mine.safetensors"
    assert registered.read_bytes() == (tmp_path / "runs" / "mine" / "mine.safetensors").read_bytes()
    date = datetime.fromisoformat(load_style(registered).meta["date"])
    assert date.utcoffset() == timedelta(0) and abs(datetime.now(timezone.utc) - date) < timedelta(minutes=10)

    # Another folder, and no run under runs/: only the library knows the name.
    monkeypatch.setenv("STYLESHIFT_RUNS", str(tmp_path / "elsewhere" / "runs"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    small_photo(tmp_path / "elsewhere" / "photo.jpg")
    code, out = run_cli("apply", "photo.jpg", "--style", "mine")
    assert code == 0, out
    assert (tmp_path / "elsewhere" / "photo.mine.jpg").exists()


def test_train_refuses_a_name_the_library_cannot_hold(tmp_path):
    code, out = run_cli("train", SAMPLE / "photos", SAMPLE / "paintings", "--name", "my style",
                        "--run-dir", tmp_path / "run", *TINY_CLI)
    assert code == 2 and "invalid style name 'my style'" in out and "--name" in out
    assert not (tmp_path / "run").exists()


def test_an_unknown_name_is_one_line_naming_the_known_styles(tiny_style, shipped, tmp_path, monkeypatch):
    styles.register(tiny_style, "mine")
    monkeypatch.setenv("STYLESHIFT_RUNS", str(tiny_style.parent.parent))  # holds the run "tiny"
    code, out = run_cli("apply", small_photo(tmp_path / "p.jpg"), "--style", "nope")
    assert code == 2
    [line] = out.strip().splitlines()
    assert "'nope' not found" in line
    assert "mine" in line and "impressionism (shipped)" in line and "tiny (in " in line
    with pytest.raises(styles.StyleNotFound, match="known styles: mine"):
        Stylizer("nope")


def test_a_library_name_comes_before_a_run_name_and_the_shipped_name(tiny_style, shipped, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLESHIFT_RUNS", str(tiny_style.parent.parent))
    assert styles.find_style("tiny") == tiny_style  # the run
    assert styles.find_style("impressionism") == shipped
    other = tmp_path / "other.safetensors"
    shutil.copy(tiny_style, other)
    for name in ("tiny", "impressionism"):
        registered = styles.register(other, name)
        assert styles.find_style(name) == registered
    assert styles.find_style(None) == shipped  # no --style: always the shipped one


def test_add_list_show_and_remove(tiny_style, shipped):
    code, out = run_cli("styles", "add", tiny_style, "--name", "mine")
    assert code == 0, out
    library = styles.library_dir()
    assert load_style(library / "mine.safetensors").meta == load_style(tiny_style).meta
    code, out = run_cli("styles", "add", tiny_style, "--name", "mine")
    assert code == 2 and "already in the library" in out and "--force" in out
    assert run_cli("styles", "add", tiny_style, "--name", "mine", "--force")[0] == 0
    assert run_cli("styles", "add", tiny_style)[0] == 0  # named as the style names itself
    assert sorted(styles.library_styles()) == ["mine", "tiny"]

    code, out = run_cli("styles")
    assert code == 0 and out == run_cli("styles", "list")[1]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:4]}
    today = datetime.now(timezone.utc).date().isoformat()
    # name, photos -> paintings, steps, crop size, file size, date
    assert rows["mine"][1:6] == ["photos", "->", "paintings", "2", "32"] and rows["mine"][7] == "KB"
    assert rows["mine"][8] == today
    assert rows["*"][1] == "impressionism" and "default" in out  # the shipped style, marked

    code, out = run_cli("styles", "show", "mine")
    assert code == 0, out
    fields = {line[:11].strip(): line[12:] for line in out.splitlines()}
    assert fields["path"] == str(library / "mine.safetensors") and fields["source"] == "library"
    assert fields["directions"] == "forward, inverse" and '"ngf": 4' in fields["generator"]
    assert fields["step"] == "2" and fields["image size"] == "32" and fields["date"].startswith(today)
    assert fields["photos"].endswith("photos") and fields["paintings"].endswith("paintings")
    assert f"({tiny_style.stat().st_size} bytes)" in fields["file size"]
    assert "(the default)" in run_cli("styles", "show", "impressionism")[1]

    code, out = run_cli("styles", "remove", "mine")
    assert code == 0 and not (library / "mine.safetensors").exists()
    code, out = run_cli("styles", "remove", "mine")
    assert code == 2 and "no style named 'mine'" in out and "tiny" in out
    code, out = run_cli("styles", "remove", "impressionism")
    assert code == 2 and "shipped" in out and "cannot be removed" in out
    assert tiny_style.exists() and shipped.exists()


def test_add_refuses_what_is_not_a_style(tiny_style, tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    for bad in (PHOTOS[0], plain):
        code, out = run_cli("styles", "add", bad, "--name", "x")
        assert code == 2 and "not a styleshift style" in out and len(out.strip().splitlines()) == 1
    code, out = run_cli("styles", "add", tiny_style, "--name", ".x")
    assert code == 2 and "invalid style name" in out
    assert styles.library_styles() == {}


def test_no_style_means_the_shipped_default(shipped, tmp_path):
    src = small_photo(tmp_path / "p.png")
    code, out = run_cli("apply", src)
    assert code == 0 and "default style, impressionism" in out, out
    assert (tmp_path / "p.tiny.png").exists()  # named as the file names itself (the real one: impressionism)
    assert Stylizer(device="cpu").style.path == shipped


@pytest.mark.parametrize("command", ["apply", "export", "eval"])
def test_a_missing_default_style_names_the_script_that_makes_it(command, tmp_path, monkeypatch):
    monkeypatch.setattr(styles, "shipped_style_file", lambda: tmp_path / "impressionism.safetensors")
    args = {"apply": [PHOTOS[0], "-o", tmp_path / "out.jpg"], "export": ["--onnx", tmp_path / "s.onnx"],
            "eval": [SAMPLE / "photos", SAMPLE / "paintings"]}[command]
    code, out = run_cli(command, *args)
    assert code == 2 and "scripts/train_default_style.sh" in out and "impressionism" in out, out
    assert not (tmp_path / "out.jpg").exists()
    assert "scripts/train_default_style.sh" in run_cli("styles")[1]


def test_register_links_and_copies_where_links_fail(tiny_style, monkeypatch):
    linked = styles.register(tiny_style, "a")
    assert os.path.samefile(linked, tiny_style)

    def no_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    copied = styles.register(tiny_style, "a")  # replaces the link
    assert copied == linked and not os.path.samefile(copied, tiny_style)
    assert copied.read_bytes() == tiny_style.read_bytes()
    assert [p.name for p in styles.library_dir().iterdir()] == ["a.safetensors"]  # no temporary left behind


def test_a_library_that_cannot_be_written_warns_but_training_goes_on(tiny_style, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("STYLESHIFT_HOME", str(tmp_path / "a-file"))
    with pytest.warns(UserWarning, match="could not add style 'tiny' to the library"):
        assert styles.register_trained(tiny_style, "tiny") is None


@pytest.mark.parametrize("folder, name", [("My Paintings", "My-Paintings"), ("monet2photo", "monet2photo"),
                                          ("...", "style"), ("Été à Giverny", "Ete-a-Giverny")])
def test_a_folder_name_becomes_a_valid_style_name(folder, name):
    assert styles.name_from(folder) == name and styles.check_name(name) == name


def test_training_never_replaces_a_style_no_run_made(tiny_style, sample_dirs, tmp_path):
    from styleshift.checkpoint import export_style, load_style
    from styleshift.trainer import Trainer

    from conftest import tiny_config

    style = load_style(tiny_style)
    mine = tmp_path / "mine.safetensors"
    export_style(mine, "mine", style.generator, {d: style.build(d) for d in ("forward", "inverse")}, {"step": 1})
    styles.register(mine, "mine", link=False)
    with pytest.raises(styles.StyleError, match="already in the library.*not made by a run.*styles remove mine"):
        Trainer(tiny_config(*sample_dirs, name="mine", steps=1), tmp_path / "run", progress=False)
    # Another run's style of the same name is replaced, with a warning.
    Trainer(tiny_config(*sample_dirs, name="again", steps=1), tmp_path / "a", progress=False).fit()
    with pytest.warns(UserWarning, match="trained in .*a, will be replaced"):
        Trainer(tiny_config(*sample_dirs, name="again", steps=1), tmp_path / "b", progress=False)
