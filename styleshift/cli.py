"""The `styleshift` command: a thin layer over the library. Heavy imports (torch) happen inside the
commands, so `styleshift --help` answers at once."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__

DEVICES = click.Choice(["auto", "cpu", "cuda", "mps"])
PRECISIONS = click.Choice(["auto", "fp32", "bf16", "fp16"])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="styleshift")
def main() -> None:
    """Learn an art style from two folders of unpaired images, then apply it to photos.

    \b
      styleshift apply photo.jpg                    (the shipped style, impressionism)
      styleshift train photos/ paintings/ --name monet
      styleshift apply photo.jpg --style monet
      styleshift apply photos/ -o out/ --style monet
      styleshift styles
      styleshift eval photos/ paintings/ --style monet
      styleshift report monet
      styleshift export monet --onnx monet.onnx
      styleshift styles
    """
    import warnings

    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A skipped file or a damaged checkpoint is news for the user, not a traceback: one line, no source.
    click.echo(f"warning: {message}", err=True)


def run() -> None:
    """The `styleshift` program (its console script, and `python -m styleshift`, which torchrun starts): the
    command, then in a process that joined a torchrun job, an exit without the interpreter's teardown (see
    styleshift.distributed.leave), also after an error. Callers that run `main` themselves (tests, other
    programs) are unaffected."""
    try:
        main(prog_name="styleshift")
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException:
        if not _joined():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if _joined():
        sys.modules["styleshift.distributed"].leave(code)
    sys.exit(code)


def _joined() -> bool:
    # Only styleshift.distributed joins a group, so a process that never imported it (`--help`: no torch
    # import either) never did.
    dist = sys.modules.get("styleshift.distributed")
    return dist is not None and dist.joined()


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


# -- train ---------------------------------------------------------------------------------------------------
# Options default to None, meaning "not given": the value then comes from the preset, or, when a run is
# resumed, from its saved configuration. (flag, config field, nested config or None)
TRAIN_OPTIONS = [
    ("generator", "arch", "generator"), ("ngf", "ngf", "generator"), ("n_blocks", "n_blocks", "generator"),
    ("upsample", "upsample", "generator"), ("downsample", "downsample", "generator"),
    ("discriminator", "arch", "discriminator"), ("ndf", "ndf", "discriminator"),
    ("n_layers", "n_layers", "discriminator"),
    *((name, name, None) for name in (
        "gan_mode", "lambda_cycle", "lambda_identity", "pool_size", "lr", "beta1", "batch_size", "load_size",
        "crop_size", "flip", "max_pixels", "epochs", "decay_epochs", "steps", "decay_steps", "seed", "device",
        "precision",
        "channels_last", "compile", "winograd", "num_workers", "log_every", "sample_every", "checkpoint_every",
        "keep_checkpoints", "num_samples",
        "eval_every")),
]


def build_train_config(base, given: dict, content, style, name):
    """`base` (defaults + preset, or a resumed run's config) with the options the user gave."""
    from dataclasses import replace

    top, nested = {}, {"generator": {}, "discriminator": {}}
    for flag, field, group in TRAIN_OPTIONS:
        if given.get(flag) is not None:
            (nested[group] if group else top)[field] = given[flag]
    if content is not None:
        top["content_dir"] = str(content)
    if style is not None:
        top["style_dir"] = str(style)
    top["name"] = name
    return replace(base, generator=replace(base.generator, **nested["generator"]),
                   discriminator=replace(base.discriminator, **nested["discriminator"]), **top)


@main.command()
@click.argument("content", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.argument("style", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="Name of the style and its run directory [default: the STYLE folder's name].")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory [default: runs/NAME]. Holding a latest.pt, it is resumed.")
@click.option("--fresh", is_flag=True, help="Start over even if the run directory holds a checkpoint.")
@click.option("--preset", type=click.Choice(["reference", "fast"]), default=None,
              help="reference: the CycleGAN paper's networks at 256 px [default]; fast: a light generator "
                   "(16 filters, separable blocks) at 128 px, identity weight 0.1: about 15x faster on a CPU.")
@click.option("--epochs", type=int, help="Epochs at a constant learning rate [100].")
@click.option("--decay-epochs", type=int, help="Epochs of linear decay to zero after them [100].")
@click.option("--steps", type=int, help="Total length in steps instead of epochs (the last half decays).")
@click.option("--decay-steps", type=int, help="With --steps: how many of them decay [half].")
@click.option("--batch-size", type=int,
              help="Images per domain per step and process [1]; N processes (--gpus N, torchrun) make the "
                   "effective batch N times larger.")
@click.option("--load-size", type=int, help="Shorter side before the random crop [286].")
@click.option("--crop-size", type=int, help="Training crop [256].")
@click.option("--flip/--no-flip", default=None, help="Random horizontal flips [on].")
@click.option("--max-pixels", type=click.IntRange(0),
              help="Refuse pictures with more pixels (decompression bombs); 0: no limit [178,956,970].")
@click.option("--lr", type=float, help="Adam learning rate [2e-4].")
@click.option("--beta1", type=float, help="Adam beta1 [0.5].")
@click.option("--gan-mode", type=click.Choice(["lsgan", "vanilla"]), help="Adversarial loss [lsgan].")
@click.option("--lambda-cycle", type=float, help="Weight of the cycle loss [10].")
@click.option("--lambda-identity", type=float, help="Identity loss, as a fraction of --lambda-cycle [0.5].")
@click.option("--pool-size", type=int, help="History of fakes shown to the discriminators [50].")
@click.option("--generator", help="Generator: resnet_9blocks, resnet_6blocks, mobile_resnet [resnet_9blocks].")
@click.option("--ngf", type=int, help="Generator filters in the first layer [64].")
@click.option("--n-blocks", type=int, help="Residual blocks [the generator's own].")
@click.option("--upsample", type=click.Choice(["transpose", "resize", "subpixel"]),
              help="Generator upsampling [transpose].")
@click.option("--downsample", type=click.Choice(["stride", "stride_reflect", "blur"]),
              help="Generator downsampling: strided convolution padded with zeros or by reflection, or blur-pool "
                   "[stride].")
@click.option("--discriminator", help="Discriminator: basic (70x70 PatchGAN), n_layers [basic].")
@click.option("--ndf", type=int, help="Discriminator filters in the first layer [64].")
@click.option("--n-layers", type=int, help="Discriminator layers, with --discriminator n_layers [3].")
@click.option("--device", type=DEVICES, help="Where to train [auto: a GPU if there is one].")
@click.option("--precision", type=PRECISIONS,
              help="auto: bf16 on CPUs with AMX/AVX512-BF16 and GPUs that have it, fp16 on other GPUs, else fp32.")
@click.option("--channels-last/--no-channels-last", default=None, help="Memory layout [on for CPUs].")
@click.option("--compile", is_flag=True, default=None, help="torch.compile the networks.")
@click.option("--winograd/--no-winograd", default=None,
              help="Winograd (NNPACK) 3x3 convolutions on CPUs: faster at 256 px, gradients within 0.5 percent [off].")
@click.option("--workers", "num_workers", type=int, help="Data loader processes [sized to the machine].")
@click.option("--seed", type=int, help="Random seed [0].")
@click.option("--log-every", type=int, help="Steps between lines of metrics.jsonl [10].")
@click.option("--sample-every", type=int, help="Steps between sample grids [500].")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints and style exports [1000].")
@click.option("--keep-checkpoints", type=click.IntRange(1), help="Checkpoints kept; latest.pt links the newest [3].")
@click.option("--num-samples", type=int, help="Fixed images per domain in the sample grid [3].")
@click.option("--eval-every", type=int, help="Steps between quality evaluations [never].")
@click.option("--gpus", type=click.IntRange(min=1),
              help="Train on N GPUs of this machine: N processes, one per GPU, started under torchrun.")
@click.option("--tensorboard", is_flag=True, help="Also log scalars and sample grids for TensorBoard (the "
              "[tensorboard] extra), in RUN/tensorboard.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(content, style, name, run_dir, fresh, preset, quiet, gpus, tensorboard, **given):
    """Learn a style from a CONTENT folder (photos) and a STYLE folder (paintings).

    The two folders are unpaired: any photos, any paintings. Running the same command on a run that
    was stopped (Ctrl-C saves) resumes it.

    Several GPUs, or several machines: `--gpus N`, or `torchrun [--nnodes ...] --nproc-per-node N -m
    styleshift train ...` (DistributedDataParallel; the effective batch is N x --batch-size per machine).
    """
    from . import distributed as dist

    if gpus is not None:
        launch_on_gpus(gpus)  # returns only for --gpus 1: this process trains
    from .config import TrainConfig, preset as preset_values
    from .styles import name_from, runs_dir

    main_process = dist.context().is_main  # under torchrun, only rank 0 speaks

    if name is None and style is None and run_dir is None:
        fail("give the CONTENT and STYLE folders (or --name/--run-dir of a run to resume)")
    run_dir = run_dir or runs_dir() / (name or name_from(style.resolve().name))
    found = None
    if not fresh:
        import warnings

        from .checkpoint import CheckpointError, find_resume

        try:
            with warnings.catch_warnings():  # the trainer warns of a damaged checkpoint, once
                warnings.simplefilter("ignore")
                found = find_resume(run_dir)
        except CheckpointError as e:
            fail(str(e))
    if found is not None:
        base = TrainConfig.from_dict(found[1]["config"])
        del found  # the trainer loads it again; a few hundred MB need not wait for it
        name = name or base.name
        if preset is not None:
            fail("--preset cannot change a run being resumed; use --fresh to start over")
        if main_process:
            click.echo(f"Resuming {run_dir} (use --fresh to start over)", err=True)
    else:
        if content is None or style is None:
            fail(f"give the CONTENT and STYLE folders: {run_dir} has no checkpoint to resume")
        base = TrainConfig(**preset_values(preset or "reference"))
        name = name or name_from((style or run_dir).resolve().name)
    from .styles import StyleError, check_name

    try:
        check_name(name)  # the style is registered under it at each checkpoint
    except StyleError as e:
        fail(f"{e}; give one with --name")
    cfg = build_train_config(base, given, content, style, name)
    from .data import DataError
    from .fsutil import DestinationError
    from .trainer import ConfigMismatch, Trainer

    try:
        result = Trainer(cfg, run_dir, fresh=fresh, progress=not quiet, tensorboard=tensorboard).fit()
    except (DataError, ConfigMismatch, ValueError) as e:
        fail(str(e))
    except DestinationError as e:
        fail(f"{e}; training stopped, the checkpoints already written are intact: make room (or make the run "
             "directory writable) and run the same command to resume", code=1)
    finally:
        dist.close()
    if result.interrupted:
        sys.exit(130)
    if main_process:
        click.echo(f"Style saved to {result.style_path}; use it with --style {name}")


def launch_on_gpus(n: int) -> None:
    """`train --gpus N`: run this same command as N processes under torchrun, then exit with their status."""
    import torch

    from . import distributed as dist

    if dist.launched():
        fail("--gpus starts the processes itself; leave it out under torchrun")
    if torch.cuda.device_count() < n:
        fail(f"--gpus {n}: this machine has {torch.cuda.device_count()} CUDA GPU(s). Several CPU processes are "
             f"started with torchrun: torchrun --nproc-per-node {n} -m styleshift train ...")
    if n > 1:
        sys.exit(dist.launch(n, command_line(click.get_current_context(), leave_out={"gpus"})))


def command_line(ctx: click.Context, leave_out: set[str] = frozenset()) -> list[str]:
    """The arguments and options this command was given, as a command line that gives them again."""
    from click.core import ParameterSource

    args, options = [ctx.info_name], []
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if param.name in leave_out or ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif param.is_flag:
            options.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            options += [param.opts[0], str(value)]
    return args + options


# -- apply ---------------------------------------------------------------------------------------------------
@main.command()
@click.argument("input", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output file or folder [file: <stem>.<style>.<ext> beside it; folder: <folder>.<style>].")
@click.option("-s", "--style", "style_spec",
              help="A style name ('styleshift styles' lists them), run name, run directory or .safetensors file "
                   "[the shipped default style, impressionism].")
@click.option("--direction", type=click.Choice(["forward", "inverse"]), default="forward", show_default=True,
              help="forward: photo -> style; inverse: style -> photo.")
@click.option("--format", "fmt", type=click.Choice(["jpg", "png", "webp", "tiff", "bmp"]),
              help="Output format [the input's].")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG/WebP quality.")
@click.option("--overwrite", is_flag=True, help="Replace outputs that already exist (inputs never are).")
@click.option("--device", type=DEVICES, default="auto", show_default=True)
@click.option("--precision", type=PRECISIONS, default="auto", show_default=True)
@click.option("--engine", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
              help="onnx: onnxruntime on the CPU, whole pictures in fp32 (pip install 'styleshift[onnx]'); "
                   "auto: onnx where it is installed, on the CPU, and a short timing finds it faster.")
@click.option("--strength", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="How much of the style: 1 the style alone, 0 the photo unchanged, between a blend.")
@click.option("--preserve-color", is_flag=True,
              help="Keep the photo's colours and take only the style's brightness and texture.")
@click.option("--max-pixels", type=click.IntRange(0),
              help="Refuse pictures with more pixels (decompression bombs); 0: no limit [178,956,970].")
@click.option("--tile-size", type=click.IntRange(min=0),
              help="Run large pictures in tiles of this many pixels a side, seamlessly (0: never tile) "
                   "[sized to the memory].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def apply(input, output, style_spec, direction, fmt, quality, overwrite, device, precision, engine, strength,
          preserve_color, max_pixels, tile_size, quiet):
    """Stylize INPUT: a picture, or a folder of pictures (recursively, sub-folders mirrored).

    Outputs keep each input's pixel size, format and orientation; existing outputs are skipped.
    """
    from . import distributed as dist
    from .apply import convert_shared, plan
    from .styles import DEFAULT_STYLE, StyleNotFound, find_style

    try:
        style_path = find_style(style_spec)
    except StyleNotFound as e:
        fail(str(e))
    ctx = dist.context()  # under torchrun, each process converts its share of the files
    if style_spec is None and ctx.is_main:
        click.echo(f"Using the default style, {DEFAULT_STYLE} (--style chooses another)", err=True)
    from .stylizer import Stylizer

    error = None
    try:
        stylizer = Stylizer(style_path, direction=direction, device=device, precision=precision, engine=engine,
                            strength=strength, preserve_color=preserve_color, tile_size=tile_size)
        jobs = plan(input, output, stylizer.name, fmt)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        error = str(e)
    error = next((e for e in ctx.gather(error) if e), None)  # a failure in any process stops them all
    if error:
        fail(error)
    summary = convert_shared(jobs, stylizer.stylize_picture, ctx, overwrite=overwrite, quality=quality,
                             progress=not quiet and ctx.is_main, max_pixels=max_pixels)
    dist.close()
    if not ctx.is_main:
        sys.exit(0 if summary.ok else 1)
    if input.is_file() and summary.converted == 1:
        click.echo(f"wrote {jobs[0].dst}")
    elif input.is_file() and summary.skipped == 1:
        click.echo(f"{jobs[0].dst} exists; --overwrite replaces it")
    else:
        click.echo(summary.line())
    if not summary.ok:
        sys.exit(1)


# -- export --------------------------------------------------------------------------------------------------
@main.command()
@click.argument("style_spec", metavar="STYLE", required=False)
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the ONNX model.")
@click.option("--direction", type=click.Choice(["forward", "inverse"]), default="forward", show_default=True,
              help="forward: photo -> style; inverse: style -> photo.")
@click.option("--check-image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The picture the export is checked on [the first the style was trained on, else a sample].")
def export(style_spec, onnx_path, direction, check_image):
    """Export STYLE's generator to ONNX, then check onnxruntime against PyTorch on a photo.

    STYLE is a style name ('styleshift styles' lists them), run name, run directory or .safetensors file
    [the shipped default style, impressionism]. The model takes N x 3 x H x W float32 RGB in [-1, 1], H and W
    multiples of 4 (pad, then crop the output back); the style's configuration is in its metadata. Fails if
    the outputs differ by more than 1e-3.
    """
    from .engine import EngineUnavailable, require_onnx
    from .styles import StyleNotFound, find_style

    try:
        require_onnx()
        style_path = find_style(style_spec)
    except (StyleNotFound, EngineUnavailable) as e:
        fail(str(e))
    from .checkpoint import load_style
    from .export import TOLERANCE, export_onnx, parity, parity_picture

    try:
        style = load_style(style_path)
        x, source = parity_picture(style, direction, check_image)
    except ValueError as e:
        fail(str(e))
    export_onnx(style, onnx_path, direction=direction)
    difference = parity(onnx_path, style, x, direction=direction)
    h, w = x.shape[-2:]
    click.echo(f"wrote {onnx_path}")
    click.echo(f"parity: max |onnx - torch| = {difference:.1e} on a {h}x{w} sample photo ({Path(source).name})")
    if not difference <= TOLERANCE:  # also catches NaN
        fail(f"the ONNX model differs from PyTorch by more than {TOLERANCE:g}", code=1)


# -- eval ----------------------------------------------------------------------------------------------------
@main.command("eval")
@click.argument("photos", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("paintings", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-s", "--style", "style_spec",
              help="A style name ('styleshift styles' lists them), run name, run directory or .safetensors file "
                   "[the shipped default style, impressionism].")
@click.option("--both", is_flag=True, help="Also measure the inverse direction (paintings -> photos).")
@click.option("--size", type=click.IntRange(16), default=256, show_default=True,
              help="Images are compared as centre crops of this side (shorter side scaled to it first).")
@click.option("--limit", type=click.IntRange(1), help="At most this many images per folder, evenly spread.")
@click.option("--normalize", type=click.Choice(["target", "per-set"]), default="target", show_default=True,
              help="target: both sets use the target set's colour statistics (global colour shifts count); "
                   "per-set: each its own, as Karras et al. 2018.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random patches and directions.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the results [eval.json in the style's run directory, else eval.<style>.json].")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--device", type=DEVICES, default="auto", show_default=True)
@click.option("--precision", type=PRECISIONS, default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_(photos, paintings, style_spec, both, size, limit, normalize, seed, json_path, batch_size, device,
          precision, quiet):
    """Measure a style offline on PHOTOS and PAINTINGS (no pretrained network, nothing downloaded).

    Prints the sliced Wasserstein distance (SWD, x1e3, per pyramid level and mean) between the paintings and
    the photos before (baseline) and after translation - lower is closer to the style - and how well the
    cycle F(G(x)) gives the photos back (PSNR, SSIM). Writes the same as JSON.
    """
    from .styles import StyleNotFound, find_style

    try:
        style_path = find_style(style_spec)
    except StyleNotFound as e:
        fail(str(e))
    from .data import DataError
    from .evaluate import evaluate, format_table, write_json

    try:
        result = evaluate(style_path, photos, paintings, size=size, both=both, limit=limit, seed=seed,
                          normalize=normalize, device=device, precision=precision, batch_size=batch_size,
                          progress=not quiet)
    except (DataError, ValueError) as e:
        fail(str(e))
    run_dir = style_path.parent if (style_path.parent / "config.json").exists() else None
    if json_path is None:
        json_path = run_dir / "eval.json" if run_dir else Path(f"eval.{result['style']}.json")
    write_json(json_path, result)
    click.echo(format_table(result))
    click.echo(f"wrote {json_path}")
    if run_dir and (run_dir / "report.html").exists():
        from .report import write_report

        write_report(run_dir)  # the run's page shows the new figures


# -- report --------------------------------------------------------------------------------------------------
@main.command()
@click.argument("run", required=False)
@click.option("--embed", is_flag=True, help="Put the sample grids inside the page too (a larger file that can "
              "be moved or sent alone).")
@click.option("--svg", is_flag=True, help="Draw the curves as SVG even when matplotlib is installed.")
def report(run, embed, svg):
    """Write RUN/report.html: curves, sample grids over time, configuration, links to the style.

    RUN is a run directory or a run name [the most recently trained run]. Training writes this page at each
    checkpoint too.
    """
    from .report import write_report
    from .styles import StyleNotFound, find_run

    try:
        run_dir = find_run(run)
    except StyleNotFound as e:
        fail(str(e))
    click.echo(f"wrote {write_report(run_dir, embed=embed, renderer='svg' if svg else 'auto')}")


# -- styles --------------------------------------------------------------------------------------------------
@main.group(invoke_without_command=True)
@click.pass_context
def styles(ctx):
    """The style library: styles kept by name, for --style NAME from any folder.

    \b
    The library is STYLESHIFT_HOME/styles [STYLESHIFT_HOME: ~/.local/share/styleshift on Linux,
    ~/Library/Application Support/styleshift on macOS, %LOCALAPPDATA%\\styleshift on Windows].
    `train --name NAME` adds its style at every checkpoint. With no command, lists the styles.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(styles_list)


@styles.command("list")
def styles_list():
    """List the styles, the default marked *.

    Each with the folders it was trained on (photos -> paintings), steps, training image size, file size, date."""
    from .styles import format_table, list_styles

    click.echo(format_table(list_styles()))


@styles.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Name in the library [the name stored in the style].")
@click.option("--force", is_flag=True, help="Replace a style of the same name.")
def styles_add(file, name, force):
    """Copy FILE, an exported style (.safetensors), into the library."""
    from .styles import StyleError, check_style_file, register

    try:
        stored_name = check_style_file(file).name
        name = name or stored_name
        path = register(file, name, replace=force, link=False)  # a copy: FILE may later change in place
    except (StyleError, OSError) as e:
        fail(str(e))
    click.echo(f"added {name} ({path})")


@styles.command("remove")
@click.argument("name")
def styles_remove(name):
    """Remove style NAME from the library.

    The run it was trained in, if any, keeps its own copy; the shipped default style stays."""
    from .styles import StyleError, remove

    try:
        path = remove(name)
    except (StyleError, OSError) as e:
        fail(str(e))
    click.echo(f"removed {name} ({path})")


@styles.command("show")
@click.argument("style_spec", metavar="STYLE")
def styles_show(style_spec):
    """Show everything stored about STYLE.

    STYLE is a name, run or .safetensors file, as for --style."""
    from .styles import StyleError, describe

    try:
        click.echo(describe(style_spec))
    except StyleError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
