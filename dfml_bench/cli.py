"""The ``dfml-bench`` command line: a thin click layer over the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__
from .threads import PROTOCOL_THREADS


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


# errors that bad input produces (a typo, a missing or damaged file, a folder that cannot be written):
# their own message is the whole story. Anything else is a bug and says how to get its traceback.
_INPUT_ERRORS = (ValueError, RuntimeError, OSError, ImportError, LookupError, EOFError)


def describe_error(exc: BaseException) -> str:
    """One line for the user: what went wrong (the exception's own message) and, for what looks like a
    bug rather than bad input, how to see the traceback."""
    import tarfile
    import zipfile

    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (EOFError, tarfile.TarError, zipfile.BadZipFile)):
        return (f"a file ended early or is damaged ({type(exc).__name__}: {msg}); if it is an archive, "
                "download or copy it again (nothing was written)")
    if isinstance(exc, KeyError):
        return f"missing entry {msg} (run with `dfml-bench --debug ...` for the traceback)"
    if isinstance(exc, _INPUT_ERRORS):
        return msg
    return (f"unexpected {type(exc).__name__}: {msg}. This is a bug in dfml-bench or a plugin: "
            "run the same command as `dfml-bench --debug ...` for the traceback and report it")


class _Main(click.Group):
    """The command group: no Python traceback reaches a user (``--debug`` or DFML_BENCH_DEBUG=1 shows it)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if ctx.meta.get("dfml_debug") or os.environ.get("DFML_BENCH_DEBUG") == "1":
                raise
            raise click.ClickException(describe_error(exc)) from exc


@click.group(cls=_Main)
@click.version_option(__version__, prog_name="dfml-bench")
@click.option("--debug", is_flag=True, help="show Python tracebacks instead of one-line errors")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """dfml-bench: benchmark data-free meta-learning methods on frozen episodes."""
    ctx.meta["dfml_debug"] = debug


@main.command("list")
@click.argument("what", type=click.Choice(["suites", "methods", "datasets", "all"]), default="all")
def list_cmd(what: str) -> None:
    """List registered suites, methods and datasets (with their packages and import errors)."""
    from .registry import load_group
    from .scenarios import suite_registry

    if what in ("suites", "all"):
        click.echo("suites:")
        for name, factory in sorted(suite_registry().items()):
            try:
                s = factory("cpu")
                click.echo(f"  {name:24s} {len(s.scenarios)} scenarios; methods {','.join(s.methods)}  {s.description}")
            except Exception as exc:  # e.g. paper-only suites
                click.echo(f"  {name:24s} ({exc})")
    for group, label in (("dfml_bench.methods", "methods"), ("dfml_bench.datasets", "datasets")):
        if what not in (label, "all"):
            continue
        click.echo(f"{label}:")
        for name, e in sorted(load_group(group).items()):
            pkg = f"{e.package} {e.version}" if e.package else "registered in-process"
            if e.error:
                click.echo(f"  {name:24s} [{pkg}] BROKEN: {e.error}")
            else:
                desc = getattr(e.obj, "description", "") or ""
                flags = " (not data-free)" if getattr(e.obj, "not_data_free", False) else ""
                click.echo(f"  {name:24s} [{pkg}] {desc}{flags}")


@main.command()
@click.option("--suite", "suite_name", required=True, help="suite to run (see `dfml-bench list suites`)")
@click.option("--scale", type=click.Choice(["cpu", "paper"]), default="cpu", show_default=True)
@click.option("--methods", help="comma-separated methods (default: the suite's)")
@click.option("--seeds", help="comma-separated seeds (default: the suite's)")
@click.option("--scenarios", help="comma-separated scenarios of the suite, full names or unique tails such as q300k "
                                  "(default: all)")
@click.option("--episodes", type=click.IntRange(min=1), help="number of test episodes (default: the scenario's, 600)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--data-root", type=click.Path(path_type=Path), help="root of real datasets (default $DFML_BENCH_DATA)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--plan", "plan_only", is_flag=True, help="print the jobs, their dependencies and what is done; run nothing")
@click.option("--launcher", type=click.Choice(["local", "submitit"]), default="local", show_default=True,
              help="local: worker processes on this machine; submitit: Slurm jobs through submitit")
@click.option("--jobs", "n_jobs", type=click.IntRange(min=1), default=None,
              help="local launcher: worker processes (default 1 = serial, in this process)")
@click.option("--threads", type=click.IntRange(min=1), default=PROTOCOL_THREADS, show_default=True,
              help="torch threads of every job, whatever the launcher (part of the protocol: results are "
                   "identical only between runs with the same count; recorded in each record)")
@click.option("--plugin", "plugins", multiple=True,
              help="module or .py file that workers import first (for suites/methods registered in-process)")
@click.option("--slurm-config", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="JSON or TOML file of Slurm settings (keys of SlurmConfig; flags override it)")
@click.option("--partition", help="Slurm partition")
@click.option("--time-min", type=click.IntRange(min=1), help="Slurm time limit per job, minutes (default 60)")
@click.option("--gpus-per-job", type=click.IntRange(min=0), help="GPUs per Slurm job (>0 runs on cuda)")
@click.option("--cpus-per-job", type=click.IntRange(min=1), help="CPUs per Slurm job (default 2)")
@click.option("--mem-gb", type=click.FloatRange(min=0, min_open=True), help="memory per Slurm job, GB")
@click.option("--array-parallelism", type=click.IntRange(min=1), help="Slurm array tasks running at once (default 64)")
@click.option("--cluster", type=click.Choice(["slurm", "local", "debug"]), default=None,
              help="submitit executor (default: slurm when sbatch exists, else local)")
@click.option("--no-wait", is_flag=True, help="submitit: submit and return; follow with `dfml-bench status OUT`")
@click.option("--fit-timeout", type=click.FloatRange(min=1), help="wall-time limit of each method's fit, seconds "
              "(default: the scenario's, else 3600 at cpu scale, 72 h at paper scale)")
@click.option("--fit-memory-gb", type=click.FloatRange(min=0.5), help="memory (address-space) limit of the fit process "
              "on CPU, GB (default 75 % of RAM)")
def run(suite_name, scale, methods, seeds, scenarios, episodes, device, out, data_root, quiet, plan_only, launcher, n_jobs, threads,
        plugins, slurm_config, partition, time_min, gpus_per_job, cpus_per_job, mem_gb, array_parallelism, cluster,
        no_wait, fit_timeout, fit_memory_gb) -> None:
    """Run a suite: every (scenario, method, seed) without a finished record; then print its table.

    Every argument is checked before any work starts. Two runs into one --out never run a job twice:
    a job another run is working on is left to it (this run waits for it at the end)."""
    from .inputs import (check_device, check_launcher_options, check_out_dir, check_plugins, parse_methods,
                         parse_seeds, split_list)
    from .jobs import JobContext, format_plan, plan_states, plan_suite
    from .launchers import LocalLauncher, SlurmConfig, SubmititLauncher
    from .paths import home
    from .runner import _validate_methods
    from .scenarios import get_suite

    log = lambda m: click.echo(m, err=True)  # noqa: E731
    slurm_flags = {"--slurm-config": slurm_config, "--partition": partition, "--time-min": time_min,
                   "--gpus-per-job": gpus_per_job, "--cpus-per-job": cpus_per_job, "--mem-gb": mem_gb,
                   "--array-parallelism": array_parallelism, "--cluster": cluster, "--no-wait": no_wait}
    # every check first, cheapest first: nothing is loaded, built or written until all of them pass
    seed_list = parse_seeds(seeds)
    method_list = parse_methods(methods)
    check_launcher_options(launcher, n_jobs, slurm_flags)
    check_plugins(plugins)  # before the suite and methods: a plugin may register them
    suite = get_suite(suite_name, scale)
    if scenarios is not None:
        suite = suite.restrict(split_list(scenarios, "--scenarios", "scenario", "q30k,q100k"))
    _validate_methods(method_list or suite.methods)
    local_gpu = launcher == "local" or cluster in ("local", "debug")
    device = check_device(device, available=local_gpu)
    if launcher == "submitit":
        flags = dict(partition=partition, time_min=time_min, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job,
                     mem_gb=mem_gb, array_parallelism=array_parallelism)
        cfg = (SlurmConfig.from_file(slurm_config, **flags) if slurm_config
               else SlurmConfig(**{k: v for k, v in flags.items() if v is not None}))
        runner = SubmititLauncher(cfg, cluster=cluster, wait=not no_wait, log=log)  # says if submitit is missing
    else:
        runner = LocalLauncher(n_jobs or 1, progress=not quiet, log=log)
    home()  # the cache (zoos, episodes) must be usable: said now, not by every job
    check_out_dir(out, create=not plan_only)  # last: the folder is made only once everything else is right
    plan = plan_suite(suite, method_list, seed_list)
    ctx = JobContext(out=str(out), device=device, episodes=episodes, data_root=str(data_root) if data_root else None,
                     plugins=tuple(plugins), threads=threads, fit_timeout=fit_timeout,
                     fit_memory_gb=fit_memory_gb)
    if plan_only:
        click.echo(format_plan(plan, plan_states(out, plan, check_zoo=True, data_root=ctx.data_root, threads=ctx.threads)))
        return
    states = runner.launch(plan, ctx)
    if no_wait:
        click.echo(format_plan(plan, states))
        return
    from .report import build_report, render_text
    from .validate import load_records

    recs = load_records(out, suite=suite.name, scale=scale)
    click.echo(render_text(build_report(recs), "simple") if recs.ok else "no finished records")
    for j in plan.jobs:
        state, reason = states[j.id]
        if reason.startswith("skipped:"):
            click.echo(f"skipped {j.scenario}/{j.method}: {reason[len('skipped: '):]}", err=True)
    bad = [(j, states[j.id]) for j in plan.jobs if states[j.id][0] != "done"]
    if bad:
        for j, (state, reason) in bad:
            click.echo(f"{state.upper()} {j.id}: {reason}", err=True)
        sys.exit(1)


@main.command()
@click.argument("records", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--device", help="device of the re-run (default: the record's)")
@click.option("--data-root", type=click.Path(path_type=Path), help="root of real datasets (default $DFML_BENCH_DATA)")
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="tolerance per episode accuracy (0: exact, as on CPU; a GPU re-run may need 1e-6)")
@click.option("--fit-timeout", type=click.FloatRange(min=1), help="wall-time limit of the re-run's fit, seconds")
@click.option("--ledger/--no-ledger", default=True, show_default=True,
              help="enter reproduced records in RESULTS/verified.json (what the leaderboard marks as re-run verified)")
def verify(records, device, data_root, atol, fit_timeout, ledger) -> None:
    """Re-run each RECORD (files or folders) in the isolated harness and say whether its per-episode
    accuracies are reproduced; every recomputation check (test-episode hash, counts, budgets, flags) first."""
    from .verify import enter_in_ledger, find_records, results_root_of, verify_record

    failed = 0
    for path in find_records(list(records)):
        try:
            v = verify_record(path, device=device, data_root=str(data_root) if data_root else None, atol=atol,
                              fit_timeout=fit_timeout)
        except (ValueError, RuntimeError) as exc:
            click.echo(f"NOT VERIFIED {path}: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        click.echo(v.summary())
        if v.reproduced and ledger:
            enter_in_ledger(results_root_of(path), path, v)
        failed += not v.reproduced
    if failed:
        sys.exit(1)


@main.command()
@click.option("--suite", "suite_name", required=True, help="suite whose scenarios the variants run on")
@click.option("--method", required=True, help="method to ablate (its ablation_switches, or --switches)")
@click.option("--switches", help="comma-separated boolean parameters to flip one at a time (default: the method's)")
@click.option("--scale", type=click.Choice(["cpu", "paper"]), default="cpu", show_default=True)
@click.option("--seeds", default="0", show_default=True, help="comma-separated seeds")
@click.option("--set", "overrides", multiple=True, help="KEY=VALUE parameter applied to every variant (JSON values)")
@click.option("--episodes", type=click.IntRange(min=1), help="number of test episodes (default: the scenario's)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--quiet", is_flag=True)
def ablate(suite_name, method, switches, scale, seeds, overrides, episodes, device, out, quiet) -> None:
    """Run METHOD with each component switched off in turn (records under OUT/ablations/) and print the
    table of differences to the full method on the same test episodes."""
    from .ablation import ablation_table, run_ablation
    from .inputs import check_device, check_out_dir, parse_methods, parse_seeds, split_list
    from .results import ABLATIONS_DIR
    from .runner import RunOptions, _validate_methods
    from .scenarios import get_suite
    from .utils import parse_params

    seed_list = parse_seeds(seeds)
    switch_list = split_list(switches, "--switches", "switch", "use_kd,use_boundary") if switches is not None else None
    parse_methods(method, "--method")
    params = parse_params(overrides)
    suite = get_suite(suite_name, scale)
    _validate_methods([method])
    device = check_device(device)
    check_out_dir(out)
    opts = RunOptions(out=out, device=device, episodes=episodes, progress=not quiet, log=None if quiet else click.echo,
                      method_params={method: params})
    paths = run_ablation(suite, method, seed_list, opts, switch_list)
    table = ablation_table(paths)
    dest = out / ABLATIONS_DIR / f"{suite.name}-{scale}-{method}.md"
    dest.write_text(f"# Ablation of {method} on {suite.name} ({scale}), seeds {seeds}\n\n"
                    f"Parameters of every variant: {params or 'defaults'}\n\n{table}\n")
    click.echo(table)
    click.echo(f"wrote {dest}")


@main.command()
@click.option("--method", required=True, help="the method under test")
@click.option("--against", required=True, help="comma-separated methods to compare it with")
@click.option("--results", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("results"), show_default=True)
@click.option("--suite", "suite_name", help="only this suite")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01, show_default=True)
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=10_000, show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="also write a forest plot (PNG) of every seed's and the pooled difference, with CIs")
def compare(method, against, results, suite_name, alpha, n_boot, plot) -> None:
    """METHOD against each of AGAINST, seed by seed (each seed's frozen episodes) and pooled: mean
    difference, bootstrap CI, paired Wilcoxon-Pratt and t p-values; says whether METHOD wins in every seed."""
    from tabulate import tabulate

    from .inputs import BadInput, check_out_file, parse_methods
    from .stats import compare_per_seed, plot_seed_comparisons
    from .validate import load_records

    others = parse_methods(against, "--against")
    if method in others:
        raise BadInput(f"--against {against!r} names --method {method!r} itself; compare it with other methods")
    if plot is not None:
        check_out_file(plot, "--plot")  # said before the (slow) bootstrap, not after it
    rs = load_records(results, suite=suite_name)  # the leaderboard's checks: a record it rejects is not compared
    for bad in rs.invalid:
        click.echo(f"rejected {bad.path}: {bad.reason} (not compared)", err=True)
    recs = rs.ok
    found = []
    for other in others:
        for c in compare_per_seed(recs, method, other, n_boot=n_boot):
            found.append(c)
            labelled = [(f"seed {s}", t) for s, t in sorted(c.per_seed.items())] + [("pooled", c.pooled)]
            rows = [[label, f"{100 * t.mean_diff:+.2f}", f"[{100 * t.ci_low:+.2f}, {100 * t.ci_high:+.2f}]",
                     f"{t.p_wilcoxon:.2g}", f"{t.p_ttest:.2g}", t.n] for label, t in labelled]
            click.echo(f"\n{c.scenario}: {method} - {other} (percentage points)")
            click.echo(tabulate(rows, headers=["", "diff", "95% CI", "p Wilcoxon", "p t", "episodes"], disable_numparse=True))
            verdict = "yes" if c.wins_every_seed(alpha) else "no"
            click.echo(f"{method} better than {other} in every seed, both tests p < {alpha}: {verdict}")
    if not found:
        raise click.ClickException(f"no scenario under {results} has ok records of both {method!r} and one of {against!r}")
    if plot is not None:
        title = f"{method} against {', '.join(others)}" + (f" on {suite_name}" if suite_name else "")
        click.echo(f"wrote {plot_seed_comparisons(found, plot, alpha, title)}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--all", "show_all", is_flag=True, help="list done jobs too (default: only counts for them)")
def status(run_dir, show_all) -> None:
    """Show the jobs of a run folder: done / running / failed / pending, with reasons."""
    from .jobs import format_plan, run_status

    problems: list[str] = []
    for plan, states in run_status(run_dir, problems):
        click.echo(format_plan(plan, states, hide_done=not show_all))
    if problems:  # a garbage plan file: the good plans are shown, then a one-line error per bad file
        for p in problems[1:]:
            click.echo(f"Error: {p}", err=True)
        raise click.ClickException(problems[0])


@main.command()
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=Path("results"), show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("leaderboard.md"), show_default=True)
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=10_000, show_default=True,
              help="paired-bootstrap resamples per comparison")
def leaderboard(results, out, n_boot) -> None:
    """Regenerate leaderboard.md from the result records (each validated first; rejected ones are listed)."""
    from .inputs import BadInput, check_input_dir, check_out_file
    from .leaderboard import write_leaderboard
    from .validate import load_records, load_reported

    check_input_dir(results, "--results")  # a mistyped folder must not overwrite the page with an empty one
    check_out_file(out)
    rs = load_records(results)
    if not (rs.ok or rs.not_ok or rs.invalid or any(load_reported(results))):
        raise BadInput(f"--results {results}: no result records there (is it the right folder?); {out} was left as it was")
    path = write_leaderboard(results, out, n_boot=n_boot)
    click.echo(f"wrote {path}: {len(rs.ok)} records counted, {len(rs.not_ok)} failed/skipped listed, "
               f"{len(rs.invalid)} invalid rejected")
    for bad in rs.invalid:
        click.echo(f"  rejected {bad.path}: {bad.reason}", err=True)


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--suite", "suite_name", help="report only this suite (records under RUN_DIR, default results/)")
@click.option("--scale", type=click.Choice(["cpu", "paper"]), help="report only this scale")
@click.option("--out", type=click.Path(path_type=Path), help="folder for report.md, CSVs, plots (default RUN_DIR/report)")
@click.option("--format", "fmt", type=click.Choice(["markdown", "plain"]), default="plain", show_default=True,
              help="how the tables are printed")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True)
@click.option("--rule", type=click.Choice(["both", "wilcoxon", "ttest"]), default="both", show_default=True,
              help="significantly worse than the best when both / one Holm-corrected test rejects")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=10_000, show_default=True)
@click.option("--no-plots", is_flag=True)
def report(run_dir, suite_name, scale, out, fmt, alpha, rule, n_boot, no_plots) -> None:
    """Significance-tested tables of a run folder (or of one suite): print them, write markdown, CSV and plots."""
    from .inputs import check_out_dir
    from .report import build_report, render_text, write_report
    from .validate import load_records

    root = run_dir or Path("results")
    if not root.exists():
        _fail(FileNotFoundError(f"no results folder {root}; pass the --out folder of `dfml-bench run`"))
    rs = load_records(root, suite=suite_name, scale=scale)
    if not rs.ok and not rs.not_ok and (suite_name or scale or not rs.invalid):
        what = (f" of suite {suite_name!r}" if suite_name else "") + (f" at scale {scale}" if scale else "")
        everything = load_records(root)
        have = sorted({f"{r.key.suite} ({r.key.scale})" for r in everything.ok + everything.not_ok})
        _fail(ValueError(f"no result records{what} under {root}" + (f"; it has records of: {', '.join(have)}" if have else "")))
    check_out_dir(out or root / "report", "--out")
    rep = build_report(rs, alpha=alpha, rule=rule, n_boot=n_boot)
    click.echo(render_text(rep, "github" if fmt == "markdown" else "simple"))
    paths = write_report(rep, out or root / "report", plots=not no_plots)
    click.echo(f"wrote {len(paths)} files to {paths[0].parent}", err=True)


@main.command()
@click.option("--suite", "suite_name", required=True, help="the leaderboard suite to submit to")
@click.option("--method", "method_name", required=True, help="your method's entry-point name (see `dfml-bench list methods`)")
@click.option("--scale", type=click.Choice(["cpu", "paper"]), default="cpu", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--data-root", type=click.Path(path_type=Path), help="root of real datasets (default $DFML_BENCH_DATA)")
@click.option("--jobs", "n_jobs", type=click.IntRange(min=1), default=1, show_default=True, help="local worker processes")
@click.option("--quiet", is_flag=True, help="no progress bars")
def submit(suite_name, method_name, scale, device, out, data_root, n_jobs, quiet) -> None:
    """Run METHOD on every scenario of SUITE with the seeds the leaderboard requires (the suite's
    leaderboard_seeds, all test episodes) and write validated records ready for a pull request."""
    from .inputs import check_device, check_out_dir
    from .jobs import JobContext, plan_suite
    from .launchers import LocalLauncher
    from .methods import get_method
    from .report import first_line
    from .runner import _validate_methods
    from .scenarios import get_suite
    from .validate import check_record

    log = lambda m: click.echo(m, err=True)  # noqa: E731
    suite = get_suite(suite_name, scale)
    _validate_methods([method_name])
    get_method(method_name)  # a plugin that fails to import (or is not a Method) stops here, with its error
    device = check_device(device)
    check_out_dir(out)
    plan = plan_suite(suite, [method_name], list(suite.leaderboard_seeds))
    ctx = JobContext(out=str(out), device=device, episodes=None, data_root=str(data_root) if data_root else None)
    LocalLauncher(n_jobs, progress=not quiet, log=log).launch(plan, ctx)
    files, problems = [], []
    for j in plan.run_jobs:
        path = j.key.path(out)
        chk = check_record(out, j.key)
        if chk.state in ("missing", "invalid"):
            problems.append(f"{path}: {chk.reason or 'no record was written'}")
            continue
        rec = chk.record
        if rec.status == "failed":
            problems.append(f"{path}: failed: {first_line(rec.error)}")
        else:
            files.append(path)
            if rec.status == "skipped":
                click.echo(f"skipped {j.scenario} (kept as a record): {first_line(rec.error)}", err=True)
    for p in problems:
        click.echo(f"NOT READY {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{len(files)} records ready for a pull request (seeds {list(suite.leaderboard_seeds)}). Commit them with:")
    click.echo(f"  git add {' '.join(str(f) for f in files)}")
    click.echo(f"  dfml-bench leaderboard --results {out} --out leaderboard.md && git add leaderboard.md")
    click.echo(f"  git commit -m \"results: {method_name} on {suite.name} ({suite.scale})\"")
    click.echo("and open a pull request (the template asks for the package, version and hardware).")


@main.group()
def data() -> None:
    """Datasets: show samples; prepare and check the real datasets."""


@data.command("show")
@click.argument("name")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG path (default NAME-samples.png)")
@click.option("--data-root", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
def data_show(name, out, data_root, seed) -> None:
    """Write a PNG grid of sample classes of each split."""
    from .datasets import load_dataset
    from .datasets.show import save_grid
    from .inputs import check_out_file

    check_out_file(out or Path(f"{name}-samples.png"))
    try:
        ds = load_dataset(name, seed=seed, data_root=str(data_root) if data_root else None)
    except (ValueError, RuntimeError) as exc:
        _fail(exc)
    path = save_grid(ds, out or Path(f"{name}-samples.png"), seed=seed)
    counts = {s: len(c) for s, c in ds.splits.items()}
    click.echo(f"{name}: {len(ds.labels)} images, {len(ds.class_names)} classes {counts}, shape {ds.image_shape}, hash {ds.hash[:12]}")
    click.echo(f"wrote {path}")


@data.command("prepare")
@click.argument("name")
@click.option("--from", "source", required=True, type=click.Path(exists=True, path_type=Path),
              help="the original release: cifar-100-python.tar.gz, CUB_200_2011.tgz, or a MiniImageNet folder with CSVs")
@click.option("--data-root", type=click.Path(path_type=Path), help="where to write NAME/ (default $DFML_BENCH_DATA)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def data_prepare(name, source, data_root, quiet) -> None:
    """Build a real dataset's folder under the data root from its original release (atomic, idempotent)."""
    from .datasets.prepare import prepare

    try:
        path = prepare(name, source, data_root, progress=not quiet, log=lambda m: click.echo(m, err=True))
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    click.echo(f"{name}: ready at {path}; verify with `dfml-bench data check {name}`")


@data.command("check")
@click.argument("name")
@click.option("--data-root", type=click.Path(path_type=Path), help="default $DFML_BENCH_DATA")
@click.option("--no-decode", is_flag=True, help="count files only; do not decode every image")
@click.option("--quiet", is_flag=True, help="no progress bar")
def data_check(name, data_root, no_decode, quiet) -> None:
    """Verify a real dataset: classes per split, images per class, image sizes, readable files."""
    from .datasets.prepare import check

    try:
        rep = check(name, data_root, decode=not no_decode, progress=not quiet)
    except (ValueError, RuntimeError) as exc:
        _fail(exc)
    click.echo(rep.format())
    if not rep.ok:
        sys.exit(1)


@main.group()
def zoo() -> None:
    """Model zoos: build or show the zoos of a suite."""


def _zoo_specs(suite_name: str, scale: str, scenario: str | None):
    from .scenarios import get_suite

    suite = get_suite(suite_name, scale)
    scens = [suite.scenario(scenario)] if scenario else suite.scenarios
    seen = {}
    for s in scens:
        seen.setdefault((s.dataset, s.dataset_seed, repr(s.zoo)), s)
    return list(seen.values())


@zoo.command("build")
@click.option("--suite", "suite_name", required=True)
@click.option("--scale", type=click.Choice(["cpu", "paper"]), default="cpu", show_default=True)
@click.option("--scenario")
@click.option("--device", default="cpu", show_default=True)
@click.option("--data-root", type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=PROTOCOL_THREADS, show_default=True,
              help="torch threads (as `run --threads`; a zoo built with another count differs in its last bits)")
@click.option("--jobs", "n_jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="models trained side by side in worker processes (CPU; the same files as one at a time)")
def zoo_build(suite_name, scale, scenario, device, data_root, threads, n_jobs) -> None:
    """Build (or repair) the zoos a suite needs, with progress."""
    from .datasets import load_dataset
    from .inputs import check_device
    from .threads import fixed_threads
    from .zoo import build_zoo

    device = check_device(device)
    specs = _zoo_specs(suite_name, scale, scenario)
    with fixed_threads(threads):  # the protocol's thread count, as in a run: the same zoo, bit for bit
        for s in specs:
            ds = load_dataset(s.dataset, seed=s.dataset_seed, data_root=str(data_root) if data_root else None, scale=scale)
            z = build_zoo(s.zoo, ds, device=device, log=lambda m: click.echo(m, err=True), workers=n_jobs)
            click.echo(_zoo_line(z))


@zoo.command("show")
@click.option("--suite", "suite_name", required=True)
@click.option("--scale", type=click.Choice(["cpu", "paper"]), default="cpu", show_default=True)
@click.option("--scenario")
@click.option("--data-root", type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=PROTOCOL_THREADS, show_default=True,
              help="show the zoos built with this torch thread count (as `zoo build --threads`)")
def zoo_show(suite_name, scale, scenario, data_root, threads) -> None:
    """Show the zoos of a suite: built or not, models, held-out accuracies."""
    from tabulate import tabulate

    from .datasets import load_dataset
    from .zoo import load_zoo, zoo_dir

    try:
        for s in _zoo_specs(suite_name, scale, scenario):
            ds = load_dataset(s.dataset, seed=s.dataset_seed, data_root=str(data_root) if data_root else None, scale=scale)
            z = load_zoo(s.zoo, ds, threads=threads)
            if z is None:
                click.echo(f"{zoo_dir(s.zoo, ds, threads=threads)}: not built (or incomplete); run `dfml-bench zoo build "
                           f"--suite {suite_name}{'' if threads == PROTOCOL_THREADS else f' --threads {threads}'}`")
                continue
            click.echo(_zoo_line(z))
            rows = [[e.index, e.arch, e.width, ",".join(map(str, e.classes)), f"{e.heldout_acc:.3f}", e.sha256[:12]] for e in z.entries]
            click.echo(tabulate(rows, headers=["#", "arch", "width", "classes", "held-out acc", "sha256"]))
    except (ValueError, RuntimeError) as exc:
        _fail(exc)


def _zoo_line(z) -> str:
    s = z.summary()
    threads = ",".join(str(t) if t else "unrecorded" for t in s["torch_threads"])
    return (f"zoo {z.path}: {s['n_models']} models {s['archs']}, held-out acc mean {s['mean_heldout_acc']:.3f} "
            f"(min {s['min_heldout_acc']:.3f}), trained with {threads} torch thread(s), weights {s['weights_hash'][:12]}")


if __name__ == "__main__":  # pragma: no cover
    main()
