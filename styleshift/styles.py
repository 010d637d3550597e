"""Styles by name: the style library, the style shipped in the package, and what `--style` resolves to.

The library is a folder of exported styles, STYLESHIFT_HOME/styles/<name>.safetensors (STYLESHIFT_HOME
defaults to the per-user data folder, see `user_data_dir`). `train` registers each style it exports there
and `styleshift styles add` puts others in, so a name works from any directory, not only beside `runs/`.

`--style SPEC` is, in this order: an existing file; a library name; a run directory or a run name under
runs/ (STYLESHIFT_RUNS); the shipped style's name. No --style means the shipped style, `impressionism`,
made by scripts/train_default_style.sh.
"""

from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .fsutil import atomic_copy, atomic_link

DEFAULT_RUNS_DIR = "runs"
DEFAULT_STYLE = "impressionism"  # the shipped style: styleshift/assets/impressionism.safetensors
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")  # a file name on every system; no hidden files


class StyleError(ValueError):
    pass


class StyleNotFound(StyleError):
    pass


# -- where things are ------------------------------------------------------------------------------------
def user_data_dir(platform: str | None = None) -> Path:
    """Each system's folder for a user's application data (what platformdirs gives, without the dependency)."""
    platform = platform or sys.platform
    if platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    elif platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:  # the XDG base directory spec ignores a relative XDG_DATA_HOME
        xdg = os.environ.get("XDG_DATA_HOME", "")
        base = xdg if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return Path(base) / "styleshift"


def home() -> Path:
    return Path(os.environ["STYLESHIFT_HOME"]).expanduser() if os.environ.get("STYLESHIFT_HOME") else user_data_dir()


def library_dir() -> Path:
    return home() / "styles"


def runs_dir() -> Path:
    return Path(os.environ.get("STYLESHIFT_RUNS", DEFAULT_RUNS_DIR))


def shipped_style_file() -> Path:
    """Where the package keeps its default style (the file is missing in a source checkout until
    scripts/train_default_style.sh has run). Through importlib.resources, so an installed wheel finds it."""
    return Path(str(resources.files("styleshift") / "assets" / f"{DEFAULT_STYLE}.safetensors"))


def shipped_style() -> Path:
    path = shipped_style_file()
    if not path.is_file():
        raise StyleNotFound(f"the default style {DEFAULT_STYLE!r} is not in this installation ({path} is missing): "
                            "a source checkout makes it with scripts/train_default_style.sh; or pass --style "
                            "NAME|FILE ('styleshift styles' lists the styles)")
    return path


# -- the library -------------------------------------------------------------------------------------------
def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise StyleError(f"invalid style name {name!r}: use letters, digits, '-', '_' and '.', not starting "
                         "with '.', at most 64 characters")
    return name


def name_from(folder_name: str) -> str:
    """A valid style name made from a folder's name ("My Paintings" -> "My-Paintings", "Été" -> "Ete")."""
    folder_name = unicodedata.normalize("NFKD", folder_name).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder_name).strip("-.")[:64].rstrip("-.")
    return name or "style"


def library_styles() -> dict[str, Path]:
    """name -> file, for every style in the library (temporary files are hidden, so never listed)."""
    folder = library_dir()
    files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stem.lower()) if folder.is_dir() else []
    return {f.stem: f for f in files if _NAME.fullmatch(f.stem)}


def register(path: str | os.PathLike, name: str, replace: bool = True, link: bool = True) -> Path:
    """Put the style file `path` into the library as `name`, atomically: readers see the old file or the
    new one, never half of one. `link` hard-links it (no copy of the weights; safe because styleshift
    rewrites a style by renaming a new file over it, never in place) and copies where linking fails,
    across filesystems for one."""
    dest = library_dir() / f"{check_name(name)}.safetensors"
    if not replace and dest.exists():
        raise StyleError(f"a style named {name!r} is already in the library ({dest}); --force replaces it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not (link and atomic_link(path, dest)):
        atomic_copy(path, dest)
    return dest


def register_trained(path: str | os.PathLike, name: str) -> Path | None:
    """register() for the trainer, at each checkpoint: a library that cannot be written warns instead of
    stopping the run (the style is safe in the run directory either way)."""
    try:
        return register(path, name)
    except (OSError, StyleError) as e:
        warnings.warn(f"could not add style {name!r} to the library {library_dir()}: {e}", stacklevel=2)
        return None


def check_trainable(name: str, run_dir: str | os.PathLike) -> None:
    """Whether a run may register its style under `name` (training replaces the library's `name` at its first
    checkpoint). Free, or this run's own: yes. Another run's: yes, with a warning (a name follows its newest
    run). A style that came from elsewhere (`styles add` of a file no run here made): no."""
    path = library_styles().get(check_name(name))
    if path is None:
        return
    try:
        owner = read_info(path).meta.get("run_dir")
    except StyleError:
        owner = None  # a damaged file: whatever it was, not this run's
    if owner is None:
        raise StyleError(f"a style named {name!r} is already in the library ({path}, not made by a run); train "
                         f"under another --name, or remove it first: styleshift styles remove {name}")
    if Path(owner) != Path(run_dir).resolve():
        warnings.warn(f"style {name!r} in the library, trained in {owner}, will be replaced by this run's",
                      stacklevel=2)


def remove(name: str) -> Path:
    path = library_styles().get(name)
    if path is None:
        if name == DEFAULT_STYLE:
            raise StyleError(f"{name!r} is the default style shipped with styleshift; it cannot be removed")
        known = ", ".join(library_styles()) or "none"
        raise StyleNotFound(f"no style named {name!r} in the library {library_dir()} (its styles: {known})")
    path.unlink()
    return path


# -- resolving --style ---------------------------------------------------------------------------------------
def style_file_in(run_dir: Path) -> Path | None:
    """The exported style of a run directory: <name>.safetensors (the newest, if several)."""
    files = sorted(run_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def run_styles(runs: Path) -> list[str]:
    return sorted(d.name for d in runs.glob("*/") if style_file_in(d)) if runs.is_dir() else []


def find_style(spec: str | os.PathLike | None, runs: Path | None = None) -> Path:
    """Resolve `spec` to a .safetensors file (the order is in the module docstring). None: the shipped style."""
    if spec is None:
        return shipped_style()
    runs = runs if runs is not None else runs_dir()
    path, name = Path(spec), str(spec)
    if path.is_file():
        return path
    if name in (library := library_styles()):
        return library[name]
    for run_dir in (path, runs / name):
        if run_dir.is_dir():
            found = style_file_in(run_dir)
            if found:
                return found
            raise StyleNotFound(f"{run_dir}: no exported style (*.safetensors) yet; it is written at each checkpoint")
    if name == DEFAULT_STYLE:
        return shipped_style()
    known = [*library, *([f"{DEFAULT_STYLE} (shipped)"] if shipped_style_file().is_file() else []),
             *(f"{r} (in {runs}/)" for r in run_styles(runs) if r not in library)]
    listed = f"known styles: {', '.join(known)}" if known else "no styles yet: train one with 'styleshift train'"
    raise StyleNotFound(f"style {name!r} not found (not a file, a library style, a run directory or a run name); "
                        f"{listed}")


def find_run(spec: str | os.PathLike | None, runs: Path | None = None) -> Path:
    """Resolve `spec` to a run directory (one holding config.json): a path, or a run name under `runs`.
    With no spec, the run trained most recently."""
    runs = runs if runs is not None else runs_dir()
    if spec is None:
        found = sorted(runs.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
        if not found:
            raise StyleNotFound(f"no run under {runs}/: train one with 'styleshift train', or name a run directory")
        return found[-1].parent
    for run_dir in (Path(spec), runs / str(spec)):
        if (run_dir / "config.json").is_file():
            return run_dir
    raise StyleNotFound(f"run {str(spec)!r} not found (not a run directory, nor a run name under {runs}/)")


# -- describing styles ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StyleInfo:
    """What `styleshift styles` shows of a style, read from its metadata alone (the weights stay on disk)."""

    name: str
    path: Path
    source: str  # "library", "shipped" or "file"
    generator: dict
    meta: dict  # step, content_dir, style_dir, crop_size, date (styles trained before dates have none)
    directions: tuple[str, ...]
    file_size: int

    @property
    def trained_on(self) -> str:
        folders = [self.meta.get(k) for k in ("content_dir", "style_dir")]
        return " -> ".join(Path(f).name for f in folders) if all(folders) else "?"


def read_info(path: Path, name: str | None = None, source: str = "file") -> StyleInfo:
    """Raises StyleError for a file that is not a styleshift style."""
    from safetensors import safe_open

    from .checkpoint import STYLE_FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
    except Exception as e:  # safetensors raises several kinds for files that are not its own
        raise StyleError(f"{path}: not a styleshift style ({e})") from None
    if metadata.get("format") != STYLE_FORMAT:
        raise StyleError(f"{path}: not a styleshift style (no '{STYLE_FORMAT}' metadata)")
    return StyleInfo(name=name or metadata.get("name", path.stem), path=path, source=source,
                     generator=json.loads(metadata.get("generator", "{}")), meta=json.loads(metadata.get("meta", "{}")),
                     directions=tuple(sorted({k.partition(".")[0] for k in keys})), file_size=path.stat().st_size)


def check_style_file(path: Path) -> StyleInfo:
    """`styles add` takes only a whole style: its metadata, then weights that load into both generators."""
    from .checkpoint import DIRECTIONS, load_style

    info = read_info(path)
    try:
        style = load_style(path)
        for direction in DIRECTIONS:
            style.build(direction)
    except Exception as e:  # a damaged file, or weights that do not fit the stored configuration
        raise StyleError(f"{path}: not a usable styleshift style ({str(e).splitlines()[0]})") from None
    return info


def list_styles() -> list[StyleInfo | StyleError]:
    """The library's styles, then the shipped one (if present); a damaged file is listed as its error."""
    found = [(name, path, "library") for name, path in library_styles().items()]
    if shipped_style_file().is_file():
        found.append((DEFAULT_STYLE, shipped_style_file(), "shipped"))
    infos = []
    for name, path, source in found:
        try:
            infos.append(read_info(path, name, source))
        except StyleError as e:
            infos.append(e)
    return infos


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_table(infos: list[StyleInfo | StyleError]) -> str:
    """The `styleshift styles` listing: one aligned row per style, the default marked with '*'."""
    lines = _rows(infos) if infos else ["no styles yet: 'styleshift train --name NAME' adds one"]
    if any(isinstance(i, StyleInfo) and i.source == "shipped" for i in infos):
        lines.append("* the default, shipped with styleshift: used when no --style is given")
    elif not shipped_style_file().is_file():
        lines.append(f"(the default style {DEFAULT_STYLE!r} is missing: scripts/train_default_style.sh makes it)")
    lines.append(f"library: {library_dir()}")
    return "\n".join(lines)


def _rows(infos: list[StyleInfo | StyleError]) -> list[str]:
    rows = [("", "name", "trained on", "steps", "image size", "file size", "date")]
    for i in infos:
        if isinstance(i, StyleError):
            rows.append(("", "?", str(i), "", "", "", ""))
            continue
        date = i.meta.get("date", "")[:16].replace("T", " ")
        rows.append(("*" if i.source == "shipped" else "", i.name, i.trained_on, str(i.meta.get("step", "?")),
                     str(i.meta.get("crop_size", "?")), human_size(i.file_size), date))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    right = {3, 4, 5}  # numbers
    return ["  ".join(v.rjust(w) if c in right else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def describe(spec: str | os.PathLike) -> str:
    """`styleshift styles show`: the style `spec` resolves to (as for --style), all it stores."""
    path = find_style(spec).resolve()
    if path == shipped_style_file().resolve():
        return format_info(read_info(path, DEFAULT_STYLE, "shipped"))
    if path.parent == library_dir().resolve():
        return format_info(read_info(path, path.stem, "library"))
    return format_info(read_info(path))


def format_info(i: StyleInfo) -> str:
    """Everything `styleshift styles show` knows about one style."""
    fields = [("name", i.name), ("source", i.source + (" (the default)" if i.source == "shipped" else "")),
              ("path", str(i.path)), ("file size", f"{human_size(i.file_size)} ({i.file_size} bytes)"),
              ("directions", ", ".join(i.directions)), ("generator", json.dumps(i.generator, sort_keys=True)),
              ("step", i.meta.get("step", "?")), ("photos", i.meta.get("content_dir", "?")),
              ("paintings", i.meta.get("style_dir", "?")), ("image size", i.meta.get("crop_size", "?")),
              ("date", i.meta.get("date", "?"))]
    fields += [(k, json.dumps(v)) for k, v in sorted(i.meta.items())
               if k not in {"step", "content_dir", "style_dir", "crop_size", "date"}]
    return "\n".join(f"{k:<11} {v}" for k, v in fields)
