"""The command line: parse options, call the API, print the report, exit with a documented code.

Exit codes (every failure prints exactly one line on stderr, never a traceback):

* 0   success: the output was written (``prune``), the listing printed (``inspect``), or the
      models agree within --max-error (``validate``).
* 1   validation failed: an output moved by more than --max-error, changed shape, or became
      NaN/Inf where the original is finite. ``prune`` then writes nothing (unless --force).
* 2   the input cannot be used or the request makes no sense: bad options, a missing, corrupt,
      unsafe or unsupported model, a model declaring more memory than the machine has, an output
      that cannot be written or would overwrite the input. Nothing is written.
* 3   an internal error, i.e. a bug in onnxcoreset (please report it; --debug shows the traceback).
      Nothing is written.
* 130 interrupted (Ctrl-C), 143 terminated (SIGTERM): temporary files are removed; the output is
      complete if the run had already placed it, else absent (it is renamed into place atomically).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import signal
import sys
import threading
import warnings
from pathlib import Path

import click
import numpy as np

from . import __version__
from .calibration import load as load_calibration
from .errors import OnnxCoresetError, OutputError, UsageError
from .io import write_text
from .pipeline import PruneConfig, inspect as inspect_model, prune_file
from .report import render_inspect, render_prune
from .validate import DEFAULT_CHAIN_PROBES, DEFAULT_PROBES, compare

EXIT_OK, EXIT_VALIDATION, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


def _shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    shapes = {}
    for value in values:
        name, _, dims = value.rpartition(":")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            shape = []
        if not name or not shape or any(d < 1 for d in shape):
            raise UsageError(f"--input-shape expects NAME:DxDx..., e.g. input:1x784; got '{value}'")
        shapes[name] = shape
    return shapes


def _data(path: str | None) -> dict[str, np.ndarray] | None:
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise UsageError(f"--data {path}: not a readable .npz file ({exc})") from None


def _beta_from(source: str, path: str, data: dict[str, np.ndarray]) -> float:
    """--beta-from: the largest sample norm over the model's float inputs in the data file."""
    from .io import load
    from .radii import largest_sample_norm

    try:
        beta = largest_sample_norm(load(source).model.graph, data)
    except ValueError as exc:
        raise UsageError(f"--beta-from {path}: {exc}") from None
    if not (beta > 0 and math.isfinite(beta)):
        raise UsageError(f"--beta-from {path}: the largest sample norm is {beta}, not a positive number")
    return beta


def _recorded_beta(model) -> float:
    """The β a pruned model was certified for (its onnxcoreset.beta metadata), else 1."""
    recorded = {p.key: p.value for p in model.metadata_props}.get("onnxcoreset.beta")
    try:
        beta = float(recorded) if recorded else 1.0
    except ValueError:
        return 1.0
    return beta if beta > 0 and math.isfinite(beta) else 1.0


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _fail(message: str, code: int) -> None:
    click.echo(f"onnxcoreset: {message}", err=True)
    sys.exit(code)


class _Terminated(BaseException):
    """SIGTERM, raised where the process is so that it unwinds like Ctrl-C and staged files go."""


def _terminated(signum, frame) -> None:
    raise _Terminated()


def _run(action) -> None:
    """Run a command body, turning every failure into one line on stderr and an exit code."""
    root = click.get_current_context().find_root().params
    debug, verbose = bool(root.get("debug")), bool(root.get("verbose"))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            if not verbose:  # numpy's RuntimeWarnings would break the one-line contract
                warnings.simplefilter("ignore")
            code = action()
    except OnnxCoresetError as exc:
        _fail(f"error: {_one_line(exc)}", exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; temporary files were removed", EXIT_INTERRUPTED)
    except _Terminated:
        _fail("terminated; temporary files were removed", EXIT_TERMINATED)
    except SystemExit:
        raise
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise  # click handles a closed stdout (``| head``)
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug)", EXIT_INTERNAL)
    except MemoryError:
        _fail("error: not enough memory for this model on this machine", EXIT_USAGE)
    except Exception as exc:  # a bug: still one line, unless --debug asks for the traceback
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug)", EXIT_INTERNAL)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    sys.exit(code)


def _check_number(option: str, value: float | None, *, positive: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise UsageError(f"{option} must be {kind} number, got {value}")


def _check_report_path(path: str | None) -> None:
    """Fail before any work if the report could not be written where asked."""
    if path is None:
        return
    folder = Path(path).parent
    if not folder.is_dir():
        raise OutputError(f"--report {path}: the folder '{folder}' does not exist")
    if Path(path).is_dir():
        raise OutputError(f"--report {path}: is a directory")


class _UsageLine(click.ClickException):
    """A click usage error (bad option value, missing argument …) shown as our one line."""

    exit_code = EXIT_USAGE

    def __init__(self, error: click.UsageError) -> None:
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
        super().__init__(_one_line(error.format_message()) + hint)

    def show(self, file=None) -> None:
        click.echo(f"onnxcoreset: error: {self.format_message()}", err=True)


class _Cli(click.Group):
    """A click group whose parsing errors follow the same one-line rule as every other failure."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as error:
            raise _UsageLine(error) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as error:
            raise _UsageLine(error) from None


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxcoreset")
@click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks of internal errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
def main(debug: bool, verbose: bool) -> None:
    """Prune hidden neurons of ONNX models with data-independent coresets."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")


@main.command()
@click.argument("source", type=click.Path(dir_okay=True))
@click.argument("target", type=click.Path(dir_okay=True))
@click.option("--keep", type=float, help="Fraction of neurons kept in every prunable layer, in (0, 1].")
@click.option("--neurons", type=int, help="Number of neurons kept per layer instead of a fraction.")
@click.option("--method", default="coreset", show_default=True,
              help="coreset | coreset-vr | uniform | percentile | sensitivity | greedy-ls | auto (try them all, "
                   "keep the lowest measured error per layer)")
@click.option("--reweight", default="none", show_default=True,
              help="none | ball-ls (refit the next layer by least squares on data-free probes) | data-ls (on "
                   "--calibration activations)")
@click.option("--sup", default="ball", show_default=True,
              help="Where sup|ψ| in the sensitivity comes from: ball (data-free) | rms | max (over --calibration).")
@click.option("--calibration", "calibration_path", type=click.Path(dir_okay=False),
              help="An .npz of model inputs keyed by input name (a few hundred samples) for data-ls, rms/max "
                   "and auto.")
@click.option("--budget", type=float,
              help="Keep this fraction of the prunable layers' parameters in all, spread across layers by "
                   "measured error, instead of --keep.")
@click.option("--epsilon", type=float,
              help="Keep in each layer the fewest neurons whose certified error bound is at most this "
                   "(with --keep/--neurons, the larger count wins).")
@click.option("--beta", type=float, default=1.0, show_default=True,
              help="L2 norm bound of one input sample, the ball the guarantees hold on: √784 = 28 for 28×28 "
                   "images in [0, 1], 255·√784 = 7140 for raw 0–255 pixels.")
@click.option("--beta-from", "beta_from", type=click.Path(dir_okay=False),
              help="Set --beta to the largest sample norm in this .npz of model inputs; its inputs also give "
                   "measured radii to layers whose radius cannot be propagated.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--input-shape", "input_shapes", multiple=True, help="NAME:DxD... for dynamic dimensions (repeatable).")
@click.option("--no-validate", is_flag=True, help="Skip the onnxruntime comparison after writing.")
@click.option("--probes", type=int, default=DEFAULT_PROBES, show_default=True, help="Random inputs to validate on.")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="Validate on inputs from an .npz file.")
@click.option("--chain-probes", type=int, default=DEFAULT_CHAIN_PROBES, show_default=True,
              help="Points per pruned layer, besides the adversarial ones, on which it is checked against its "
                   "certified bound (0: skip).")
@click.option("--max-error", type=float,
              help="Fail (exit 1, write nothing) if any output moves more than this. Every pruned layer is also "
                   "checked against its certified bound (see --chain-probes).")
@click.option("--force", is_flag=True, help="Allow overwriting the input; write even when validation fails.")
def prune(source, target, keep, neurons, epsilon, method, reweight, sup, calibration_path, budget, beta, beta_from, seed,
          report_path, device, input_shapes, no_validate, probes, data_path, chain_probes, max_error, force) -> None:
    """Prune SOURCE and write the smaller model to TARGET."""

    def action() -> int:
        if keep is None and neurons is None and epsilon is None and budget is None:
            raise UsageError("give --keep FRACTION, --neurons N, --epsilon E or --budget FRACTION")
        _check_number("--budget", budget)
        if probes < 1:
            raise UsageError("--probes must be at least 1")
        if chain_probes < 0:
            raise UsageError("--chain-probes must be non-negative")
        _check_number("--max-error", max_error)
        _check_number("--epsilon", epsilon)
        _check_report_path(report_path)
        radius_data, beta_used, beta_source = None, beta, "given"
        if beta_from is not None:
            radius_data = _data(beta_from)
            beta_used, beta_source = _beta_from(source, beta_from, radius_data), f"measured on {beta_from}"
        config = PruneConfig(keep=keep, neurons=neurons, method=method, beta=beta_used, seed=seed, epsilon=epsilon,
                             reweight=reweight, sup=sup, budget=budget)
        calibration = load_calibration(calibration_path) if calibration_path else None
        report = prune_file(
            source, target, config, validate=not no_validate, device=device, probes=probes,
            shapes=_shapes(input_shapes), data=_data(data_path), max_error=max_error, force=force,
            radius_data=radius_data, radius_data_name=str(beta_from), beta_source=beta_source,
            chain_probes=chain_probes, calibration=calibration,
        )
        click.echo(render_prune(report))
        if report_path:
            write_text(report_path, report.to_json())
        failed = report.validation is not None and not report.validation.ok
        if failed and not report.outputs:
            click.echo(f"onnxcoreset: validation failed; {target} was not written", err=True)
        return EXIT_VALIDATION if failed else EXIT_OK

    _run(action)


@main.command()
@click.argument("source", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(source, as_json: bool) -> None:
    """List the prunable chains of SOURCE and the skipped ones with their reasons."""

    def action() -> int:
        report = inspect_model(source)
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True) if as_json else render_inspect(report))
        return EXIT_OK

    _run(action)


@main.command()
@click.argument("original", type=click.Path(dir_okay=True))
@click.argument("pruned", type=click.Path(dir_okay=True))
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="Inputs from an .npz file.")
@click.option("--probes", type=int, default=DEFAULT_PROBES, show_default=True, help="Random model inputs.")
@click.option("--chain-probes", type=int, default=DEFAULT_CHAIN_PROBES, show_default=True,
              help="Points per pruned layer, besides the adversarial ones, on which it is checked against its "
                   "certified bound (0: skip).")
@click.option("--beta", type=float, help="Radius of the random model inputs [default: the pruned model's β, else 1].")
@click.option("--max-error", type=float, help="Exit 1 if any output moves more than this.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--input-shape", "input_shapes", multiple=True)
@click.option("--seed", type=int, default=0, show_default=True)
def validate(original, pruned, data_path, probes, chain_probes, beta, max_error, device, input_shapes, seed) -> None:
    """Compare PRUNED against ORIGINAL with onnxruntime: end to end, and layer by layer against the
    certified bounds recorded in PRUNED. Exit 1 if an output moves more than --max-error or a layer
    more than its certified bound."""

    def action() -> int:
        from .io import load

        if probes < 1:
            raise UsageError("--probes must be at least 1")
        if chain_probes < 0:
            raise UsageError("--chain-probes must be non-negative")
        _check_number("--beta", beta, positive=True)
        _check_number("--max-error", max_error)
        if seed < 0:
            raise UsageError(f"--seed must be non-negative, got {seed}")
        loaded = [load(path) for path in (original, pruned)]  # one clear error for a bad file first
        radius = beta if beta is not None else _recorded_beta(loaded[1].model)
        result = compare(
            Path(original), Path(pruned), device=device, probes=probes, beta=radius, seed=seed,
            shapes=_shapes(input_shapes), data=_data(data_path), max_error=max_error, chain_probes=chain_probes,
        )
        for out in result.outputs:
            click.echo(f"{out.name}: max abs {out.max_abs:.6g}, mean L1 {out.mean_l1:.6g}")
        for chain in result.chains:
            click.echo(
                f"layer {chain.name}: max abs {chain.max_abs:.6g} (adversarial {chain.adversarial_max_abs:.6g}) "
                f"<= certified {chain.certified_bound:.6g} on radius {chain.radius:.4g} ({chain.radius_kind}): "
                f"{'ok' if chain.ok else 'EXCEEDED'}; {chain.probes} probes, {chain.probes_per_second:,.0f}/s"
            )
        for note in result.notes:
            click.echo(f"note: {note}")
        click.echo(f"{result.probes} probes on {result.provider}: " + ("passed" if result.ok else "FAILED"))
        for failure in result.failures:
            click.echo(f"  {failure}")
        return EXIT_OK if result.ok else EXIT_VALIDATION

    _run(action)


if __name__ == "__main__":
    main()
