"""Prune time and peak memory of onnxcoreset against the cost of reading and writing the model.

For each generated model (see gen_big_models.py) this runs, side by side and one fresh process
per measurement, the median of ``--repeat`` runs of:

* ``ours``: ``onnxcoreset prune IN OUT --keep 0.5 --no-validate`` (the working tree's package);
* ``floor``: ``onnx.load`` + ``onnx.save`` of the original (external data in and out as the input
  has it): the least any tool that reads and writes the model with onnx can cost;
* ``onnxsim``: onnx-simplifier 0.8.1's ``apply_structured_pruning(sparsity=0.5)``, loaded and saved
  the same way (a benchmark-only dependency);
* ``gs``: a no-op onnx-graphsurgeon ``import_onnx`` / ``export_onnx`` round trip;
* ``ours+val``: ``onnxcoreset prune`` with its default validation, to state validation's cost.

Wall time is the child's whole life (interpreter start and imports included, as a user sees it);
peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (file pages it mapped count too). Runs
are interleaved (ours, floor, onnxsim, … then again) so drift hits every tool alike. The page
cache is warmed by reading the model once before timing, and its state is reported (fincore).

    python tools/bench_speed.py                      # the three models of issue 7, 3 runs each
    python tools/bench_speed.py --quick              # small models, a smoke test (~1 min)
    python tools/bench_speed.py --models ffn_4096x12 --tools ours,floor --repeat 1
    python tools/bench_speed.py --scaling            # prune time at ~0.1, 0.5, 1 and 3 GB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
REPO = TOOLS_DIR.parent
sys.path.insert(0, str(TOOLS_DIR))

import gen_big_models as gen

DEFAULT_MODELS = ["vgg16_head", "ffn_1024x24", "ffn_4096x6"]
QUICK_MODELS = ["quick_vgg_head", "quick_ffn_256x4", "quick_ffn_512x8"]
SCALING_MODELS = ["ffn_1024x3", "ffn_1024x15", "ffn_1024x30", "ffn_1024x90"]
ALL_TOOLS = ["ours", "floor", "onnxsim", "gs", "ours+val"]
TOOL_LABELS = {
    "ours": "onnxcoreset prune --no-validate",
    "floor": "onnx load+save (floor)",
    "onnxsim": "onnxsim 0.8.1 structured pruning",
    "gs": "onnx-graphsurgeon round trip",
    "ours+val": "onnxcoreset prune (default validation)",
}


# --------------------------------------------------------------------------- workers (child side)


def _save_like_input(model, source: Path, target: Path) -> None:
    import onnx

    external = any(p != source for p in gen.files_of(source))
    if external:
        onnx.save(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=target.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(target))


def _worker(tool: str, source: Path, target: Path) -> None:
    """One measurement's work, in its own process."""
    import onnx

    if tool == "floor":
        model = onnx.load(str(source))
    elif tool == "onnxsim":
        import onnxsim

        model = onnxsim.apply_structured_pruning(onnx.load(str(source)), sparsity=0.5)
    elif tool == "gs":
        import onnx_graphsurgeon as gs

        model = gs.export_onnx(gs.import_onnx(onnx.load(str(source))))
    else:
        raise SystemExit(f"unknown worker tool {tool}")
    _save_like_input(model, source, target)


# --------------------------------------------------------------------------- parent side


@dataclass
class Run:
    wall_s: float
    peak_rss_bytes: int
    output_bytes: int
    ok: bool
    note: str = ""


@dataclass
class Result:
    model: str
    model_bytes: int
    runs: dict[str, list[Run]] = field(default_factory=dict)
    cache_before: str = ""
    cache_after: str = ""

    def median(self, tool: str, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs.get(tool, []) if r.ok]
        return statistics.median(values) if values else None


def command_for(tool: str, source: Path, target: Path) -> list[str]:
    if tool in ("ours", "ours+val"):
        cmd = [sys.executable, "-m", "onnxcoreset.cli", "prune", str(source), str(target), "--keep", "0.5"]
        return cmd + (["--no-validate"] if tool == "ours" else [])
    return [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(source), str(target)]


def measure(cmd: list[str], target: Path) -> Run:
    """Run one child, return its wall time and peak RSS, then remove what it wrote."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors, env=env, cwd=str(REPO))
        _, status, usage = os.wait4(child.pid, 0)  # wait4, not wait(): it returns this child's own rusage
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        stderr = errors.read()
    written = [p for p in target.parent.iterdir() if p.name.startswith(target.name)]
    size = sum(p.stat().st_size for p in written)
    for path in written:
        path.unlink()
    ok = child.returncode == 0
    note = "" if ok else (stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1][:200]
    return Run(wall, usage.ru_maxrss * 1024, size, ok, note)


def page_cache_state(files: list[Path]) -> str:
    """How much of the model's files the page cache holds, via util-linux fincore."""
    if not shutil.which("fincore"):
        return "unknown (no fincore)"
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    resident = total = 0
    for line in out.split("\n"):
        if line.strip():
            res, size = line.split()
            resident, total = resident + int(res), total + int(size)
    return f"{100 * resident / max(total, 1):.0f}% resident"


def warm(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def run_model(name: str, tools: list[str], repeat: int, work: Path, log) -> Result:
    spec = gen.SPECS[name]
    # In a process of its own: Linux carries a parent's peak RSS at fork into the child's
    # ru_maxrss, so a parent that had generated a model in-process would inflate every reading.
    subprocess.run([sys.executable, str(TOOLS_DIR / "gen_big_models.py"), "--out", str(work / "models"), name],
                   check=True, stdout=subprocess.DEVNULL)
    source = gen.model_path(spec, work / "models")
    files = gen.files_of(source)
    result = Result(name, sum(p.stat().st_size for p in files))
    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    warm(files)
    result.cache_before = page_cache_state(files)
    log(f"{name}: {result.model_bytes / 1e9:.3f} GB, page cache {result.cache_before}")
    for rep in range(repeat):
        for tool in tools:
            target = out_dir / f"{name}.{tool.replace('+', '_')}.onnx"
            run = measure(command_for(tool, source, target), target)
            result.runs.setdefault(tool, []).append(run)
            status = "" if run.ok else f"  FAILED: {run.note}"
            log(f"  [{rep + 1}/{repeat}] {tool:9s} {run.wall_s:7.2f} s  {run.peak_rss_bytes / 1e9:6.2f} GB"
                f"  out {run.output_bytes / 1e9:.3f} GB{status}")
    result.cache_after = page_cache_state(files)
    return result


def _fmt(value: float | None, unit: str = "") -> str:
    return "failed" if value is None else f"{value:.2f}{unit}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def render(results: list[Result], tools: list[str], repeat: int, command: str) -> str:
    lines = [
        "# Prune speed and memory against the load+save floor",
        "",
        f"Command: `{command}`  ",
        (f"Machine: {os.cpu_count()} CPUs, {_mem_total() / 2**30:.0f} GiB RAM, Python {platform.python_version()}, "
         f"{_versions()}  "),
        (f"Median of {repeat} runs, one fresh process per run, runs interleaved across tools. Wall time includes "
         "interpreter start and imports; peak RSS is the child's ru_maxrss (mapped file pages included).  "),
        "Page cache: warm (each model read once before timing); residency per model below.",
        "",
        "| model | size | tool | wall s | peak RSS GB | output GB | wall / floor | RSS / floor | RSS / model size |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        floor_wall, floor_rss = res.median("floor", "wall_s"), res.median("floor", "peak_rss_bytes")
        for tool in tools:
            wall, rss, out = (res.median(tool, a) for a in ("wall_s", "peak_rss_bytes", "output_bytes"))
            lines.append(
                f"| {res.model} | {res.model_bytes / 1e9:.3f} GB | {TOOL_LABELS[tool]} | {_fmt(wall)} | "
                f"{_fmt(rss and rss / 1e9)} | {_fmt(out and out / 1e9)} | {_ratio(wall, floor_wall)} | "
                f"{_ratio(rss, floor_rss)} | {_ratio(rss, res.model_bytes)} |"
            )
    lines += ["", "## Ratios and targets", "",
              ("| model | ours/floor wall (≤1.1) | ours/floor RSS (≤1.1) | ours RSS/model (≤1.5 on 3.22 GB) | "
               "onnxsim/ours wall (≥1.5) | ours/onnxsim RSS (≤0.6) | validation cost s | page cache before/after |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in results:
        wall, rss = res.median("ours", "wall_s"), res.median("ours", "peak_rss_bytes")
        val = res.median("ours+val", "wall_s")
        lines.append(
            f"| {res.model} | {_ratio(wall, res.median('floor', 'wall_s'))} | "
            f"{_ratio(rss, res.median('floor', 'peak_rss_bytes'))} | {_ratio(rss, res.model_bytes)} | "
            f"{_ratio(res.median('onnxsim', 'wall_s'), wall)} | {_ratio(rss, res.median('onnxsim', 'peak_rss_bytes'))} | "
            f"{'–' if val is None or wall is None else f'{val - wall:+.2f}'} | {res.cache_before} / {res.cache_after} |"
        )
    failures = [(res.model, tool, run.note) for res in results for tool, runs in res.runs.items() for run in runs if not run.ok]
    if failures:
        lines += ["", "Failed runs:", ""] + [f"- {m} / {t}: {n}" for m, t, n in failures]
    lines += ["", "Raw runs (wall s, peak RSS GB):", ""]
    for res in results:
        for tool, runs in res.runs.items():
            values = ", ".join(f"{r.wall_s:.2f}/{r.peak_rss_bytes / 1e9:.2f}" + ("" if r.ok else " (failed)") for r in runs)
            lines.append(f"- {res.model} {tool}: {values}")
    return "\n".join(lines) + "\n"


def render_scaling(results: list[Result], command: str) -> str:
    lines = ["# Prune time against model size (same 1024-4096 FFN block, repeated)", "",
             f"Command: `{command}`", "",
             "| model | size GB | prune s | floor s | prune/floor | prune s per GB | peak RSS GB | RSS / size |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in results:
        wall, floor = res.median("ours", "wall_s"), res.median("floor", "wall_s")
        rss = res.median("ours", "peak_rss_bytes")
        gb = res.model_bytes / 1e9
        lines.append(f"| {res.model} | {gb:.2f} | {_fmt(wall)} | {_fmt(floor)} | {_ratio(wall, floor)} | "
                     f"{_fmt(wall and wall / gb)} | {_fmt(rss and rss / 1e9)} | {_ratio(rss, res.model_bytes)} |")
    return "\n".join(lines) + "\n"


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for package in ("onnx", "numpy", "protobuf", "onnxsim", "onnx_graphsurgeon"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} missing")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[1], Path(argv[2]), Path(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"Comma-separated names from gen_big_models.SPECS (default {','.join(DEFAULT_MODELS)}).")
    parser.add_argument("--tools", default=",".join(ALL_TOOLS), help=f"Comma-separated subset of {','.join(ALL_TOOLS)}.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs per tool and model; the median is reported.")
    parser.add_argument("--quick", action="store_true", help="Small models, one run each: a smoke test.")
    parser.add_argument("--scaling", action="store_true", help="Prune time at ~0.1, 0.5, 1 and 3 GB (ours and floor).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnxcoreset-bench"), help="Where models and outputs go.")
    parser.add_argument("--results", type=Path, help="Markdown file to write (default tools/results/bench_speed[_scaling|_quick].md).")
    parser.add_argument("--clean", action="store_true", help="Delete the generated models afterwards.")
    args = parser.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in ALL_TOOLS]
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {ALL_TOOLS}")
    if args.scaling:
        names, tools = SCALING_MODELS, [t for t in tools if t in ("ours", "floor")] or ["ours", "floor"]
    elif args.quick:
        names = QUICK_MODELS
    else:
        names = DEFAULT_MODELS
    if args.models:
        names = args.models.split(",")
    repeat = 1 if args.quick and args.repeat == 3 else args.repeat
    missing = [n for n in names if n not in gen.SPECS]
    if missing:
        parser.error(f"unknown models {missing}; choose from {sorted(gen.SPECS)}")
    free = shutil.disk_usage(args.work.parent if not args.work.exists() else args.work).free
    need = sum(2 * gen.SPECS[n].nbytes for n in names)
    if free < need:
        parser.error(f"{args.work}: {free / 1e9:.1f} GB free, these models need about {need / 1e9:.1f} GB")
    args.work.mkdir(parents=True, exist_ok=True)
    command = "python tools/bench_speed.py " + " ".join(argv)

    def log(message: str) -> None:
        print(message, flush=True)

    results = []
    try:
        for name in names:
            results.append(run_model(name, tools, repeat, args.work, log))
    finally:
        if args.clean:
            for name in names:
                shutil.rmtree(args.work / "models" / name, ignore_errors=True)
    text = render_scaling(results, command) if args.scaling else render(results, tools, repeat, command)
    suffix = "_scaling" if args.scaling else "_quick" if args.quick else ""
    out = args.results or TOOLS_DIR / "results" / f"bench_speed{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print()
    print(text)
    print(f"written to {out}")
    (out.with_suffix(".json")).write_text(json.dumps(
        [{"model": r.model, "bytes": r.model_bytes, "cache": [r.cache_before, r.cache_after],
          "runs": {t: [vars(x) for x in runs] for t, runs in r.runs.items()}} for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
