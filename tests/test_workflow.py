"""The Snakemake layer and the code: dry-run, lint, formatting and types are clean; the config is strict."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from readme import page, slurm_short_form

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_dry_run_plans_the_demo(tmp_path: Path):
    proc = run("snakemake", "-n", "--quiet", "rules", "--config", f"results={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "demo_cohort" in proc.stdout + proc.stderr


def test_snakefmt_is_clean():
    assert shutil.which("snakefmt")
    proc = run("snakefmt", "--check", "Snakefile", "workflow")
    assert proc.returncode == 0, proc.stderr


def test_ruff_is_clean():
    proc = run("ruff", "check", "src", "tests", "benchmarks")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean():
    proc = run("mypy")  # files and settings: [tool.mypy] in pyproject.toml
    assert proc.returncode == 0 and "Success" in proc.stdout, proc.stdout + proc.stderr


def test_lint_is_clean():
    """Every lint but one: "Specify a conda environment or container", which no rule can honestly follow (the
    software is the package's virtual environment; see the conda test below)."""
    import re

    proc = run("snakemake", "--lint")
    text = proc.stdout + proc.stderr
    found = set(re.findall(r"^\s+\* (.+?):$", text, re.M))
    assert "Lints for rule bias_correct" in text and found == {"Specify a conda environment or container for each rule."}, text


def test_an_unknown_config_key_stops_the_run_and_is_named(tmp_path: Path):
    for typo in ("batchsize=2", "n4={'shrink': [8, 8, 1], 'iterations': [50], 'bias_fwhm': 0.3, 'fwhm': 0.2}"):
        proc = run("snakemake", "-n", "--config", f"results={tmp_path}", typo)
        assert proc.returncode != 0
        key = typo.split("=")[0] if typo.startswith("batch") else "fwhm"
        assert f"Additional properties are not allowed ('{key}' was unexpected)" in proc.stdout + proc.stderr


def test_the_config_shows_the_packages_defaults():
    import yaml

    from spinecohort import defaults

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert config["n4"] == {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.N4.items()}
    assert config["max_voxels"] == defaults.MAX_VOXELS


def test_the_readme_slurm_short_form_plans_jobs_with_the_profiles_threads(tmp_path: Path):
    """The README's two lines for `--profile slurm`, verbatim (a home of our own), plan the GPU jobs with
    the profile's threads: no other profile caps them at this machine's cores."""
    import shlex

    import yaml

    from spinecohort.phantom import write_cohort

    link, command = slurm_short_form()
    env = {"PATH": f"{Path(shutil.which('snakemake') or '').parent}:/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    subprocess.run(["bash", "-c", link], cwd=ROOT, env=env, check=True)
    assert (tmp_path / "home" / ".config" / "snakemake" / "slurm" / "config.yaml").is_file()
    manifest = write_cohort(tmp_path / "cohort", subjects=1)
    overrides = ["-n", "-p", "--config", f"results={tmp_path / 'results'}", f"manifest={manifest}",
                 "semantic_model={path: demo}", "instance_model={path: demo}", "labeling_model={path: demo}"]  # fmt: skip
    proc = subprocess.run([*shlex.split(command), *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    threads = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())["set-threads"]
    for rule, cli in (("predict_fold", "predict-fold"), ("assemble_instances", "assemble-instances"), ("label_vertebrae", "label-vertebrae")):
        planned = {line.split("--threads ")[1].split()[0] for line in proc.stdout.splitlines() if f"spinecohort {cli}" in line}
        assert planned == {str(threads[rule])}, (rule, planned)


def test_runtimes_follow_each_batchs_own_size_not_the_configs(tmp_path: Path):
    """A manifest batched by 3 run with a config that says 1: SLURM is asked for 3 images' time per batch."""
    from spinecohort.phantom import write_cohort

    manifest = write_cohort(tmp_path / "cohort", subjects=1)  # one batch of the subject's 3 stations
    config = tmp_path / "config.yaml"
    config.write_text(f"results: {tmp_path / 'results'}\nmanifest: {manifest}\nbatch_size: 1\ndemo: {{enabled: false}}\n")
    proc = run("snakemake", "-n", "--configfile", str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {block.split(":")[0]: block for block in proc.stdout.split("\nrule ")[1:]}
    for rule, per_image in (("predict_fold", 1.0), ("bias_correct", 0.5), ("label_levels", 0.1)):
        assert f"runtime={int(10 + per_image * 3)}" in jobs[rule], jobs[rule]


def test_fold_logits_go_to_the_runs_own_scratch_folder_and_claim_the_capped_resource(tmp_path: Path):
    """`scratch.path` moves only the fold logits, into a folder of this run; each fold job claims its
    batch's images x `mib_per_image` of `scratch_mib`, which the SLURM profile caps."""
    import yaml

    from spinecohort import layout
    from spinecohort.phantom import write_cohort

    manifest = write_cohort(tmp_path / "cohort", subjects=1)  # one batch of 3 images
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "manifest": str(manifest), "demo": {"enabled": False},
                                      "scratch": {"path": str(tmp_path / "scratch"), "mib_per_image": 12.5}}))  # fmt: skip
    proc = run("snakemake", "-n", "--configfile", "config/config.yaml", str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = proc.stdout.split("\nrule ")[1:]
    folds = [b for b in jobs if b.startswith("predict_fold:")]
    own = tmp_path / "scratch" / layout.scratch_folder(tmp_path / "results")
    expected = {f"output: {own / 'b0001' / layout.folder('predict-fold').format(fold=f)}" for f in (0, 1, 2)}
    assert {line.strip() for b in folds for line in b.splitlines() if "output:" in line} == expected
    assert all(re.search(r"scratch_mib=38\b", b) for b in folds), folds  # 12.5 MiB x 3 images, rounded up
    averaging = next(b for b in jobs if b.startswith("average_folds:"))
    assert all(folder.removeprefix("output: ") in averaging for folder in expected)  # read from there
    assert (tmp_path / "results" / "work" / "b0001" / layout.folder("average-folds")).as_posix() in averaging
    cap = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())["resources"]["scratch_mib"]
    assert cap >= 150 * yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["scratch"]["mib_per_image"]


def test_no_rule_asks_for_a_conda_env_and_the_docs_say_what_to_use():
    """`--sdm conda` cannot build an env that installs this package (Snakemake copies the env file away from the
    repository): the rules carry no `conda:` directive, and the cluster page says so."""
    import re

    rules = [ROOT / "Snakefile", *(ROOT / "workflow" / "rules").glob("*.smk")]
    assert len(rules) >= 9
    assert [p.name for p in rules if re.search(r"^\s+conda:", p.read_text(), re.M)] == []
    assert "no `conda:` directives and `--sdm conda` is not supported" in page("cluster.md")
