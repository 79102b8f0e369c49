"""The command line: parse options, call the API, print the report, exit with a documented code.

Exit codes: 0 success; 1 validation failed (deviation over --max-error, shape change, NaN);
2 bad usage or an unusable model (one line on stderr); 3 an internal error (a bug: please report).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__
from .errors import OnnxCoresetError, UsageError
from .pipeline import PruneConfig, inspect as inspect_model, prune_file
from .report import render_inspect, render_prune
from .validate import DEFAULT_PROBES, compare

EXIT_OK, EXIT_VALIDATION, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


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


def _run(action) -> None:
    """Run a command body, turning every failure into one line and an exit code."""
    debug = "--debug" in sys.argv
    try:
        code = action()
    except OnnxCoresetError as exc:
        click.echo(f"onnxcoreset: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a bug: still one line, unless --debug asks for the traceback
        if debug:
            raise
        click.echo(f"onnxcoreset: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--method", default="coreset", show_default=True, help="coreset | uniform | percentile | sensitivity")
@click.option("--beta", type=float, default=1.0, show_default=True, help="L2 radius of the model input.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--input-shape", "input_shapes", multiple=True, help="NAME:DxD... for dynamic dimensions (repeatable).")
@click.option("--no-validate", is_flag=True, help="Skip the onnxruntime comparison after writing.")
@click.option("--probes", type=int, default=DEFAULT_PROBES, show_default=True, help="Random inputs to validate on.")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="Validate on inputs from an .npz file.")
@click.option("--max-error", type=float, help="Fail (exit 1, write nothing) if any output moves more than this.")
@click.option("--force", is_flag=True, help="Allow overwriting the input; write even when validation fails.")
def prune(source, target, keep, neurons, method, beta, seed, report_path, device, input_shapes, no_validate,
          probes, data_path, max_error, force) -> None:
    """Prune SOURCE and write the smaller model to TARGET."""

    def action() -> int:
        if keep is None and neurons is None:
            raise UsageError("give --keep FRACTION or --neurons N")
        if probes < 1:
            raise UsageError("--probes must be at least 1")
        config = PruneConfig(keep=keep, neurons=neurons, method=method, beta=beta, seed=seed)
        report = prune_file(
            source, target, config, validate=not no_validate, device=device, probes=probes,
            shapes=_shapes(input_shapes), data=_data(data_path), max_error=max_error, force=force,
        )
        click.echo(render_prune(report))
        if report_path:
            Path(report_path).write_text(report.to_json())
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
@click.option("--probes", type=int, default=DEFAULT_PROBES, show_default=True)
@click.option("--beta", type=float, default=1.0, show_default=True, help="Radius of the random probes.")
@click.option("--max-error", type=float, help="Exit 1 if any output moves more than this.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--input-shape", "input_shapes", multiple=True)
@click.option("--seed", type=int, default=0, show_default=True)
def validate(original, pruned, data_path, probes, beta, max_error, device, input_shapes, seed) -> None:
    """Compare PRUNED against ORIGINAL on the same inputs with onnxruntime."""

    def action() -> int:
        from .io import load

        for path in (original, pruned):
            load(path)  # one clear error for a bad file before onnxruntime sees it
        result = compare(
            Path(original), Path(pruned), device=device, probes=probes, beta=beta, seed=seed,
            shapes=_shapes(input_shapes), data=_data(data_path), max_error=max_error,
        )
        for out in result.outputs:
            click.echo(f"{out.name}: max abs {out.max_abs:.6g}, mean L1 {out.mean_l1:.6g}")
        click.echo(f"{result.probes} probes on {result.provider}: " + ("passed" if result.ok else "FAILED"))
        for failure in result.failures:
            click.echo(f"  {failure}")
        return EXIT_OK if result.ok else EXIT_VALIDATION

    _run(action)


if __name__ == "__main__":
    main()
