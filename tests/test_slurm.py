"""The demo cohort on a real one-node SLURM cluster (scripts/slurm-local.sh), through profiles/slurm.

Needs root and Debian's slurm packages (the script installs them); `.ci/run` runs it.
"""

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from readme import slurm_short_form

from spinecohort import io

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm
# The test overrides: fast status checks; the profile's 4 CPUs per GPU job do not fit a 2-CPU node.
# The plugin checks a new job after the initial wait i, and after each check that finds no job ended it waits 10 s
# longer than before (`--seconds-between-status-checks` is not used): checks at i, 2i + 10, 3i + 30 s. No job ends
# within 4 s of its submission on the test cluster (a 1-3 s job was seen done at 14 s with i = 2, at 18 s with
# i = 4), so the smallest wait, 1 s, sees each job soonest.
TEST_OVERRIDES = ["--slurm-init-seconds-before-status-checks", "1", "--set-threads", "predict_fold=2", "assemble_instances=2"]


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("apt-get") is None:
        pytest.fail("the SLURM test needs a Debian machine (apt-get) to install its cluster")
    subprocess.run(["bash", ROOT / "scripts" / "slurm-local.sh", "up"], check=True, timeout=600)
    yield
    subprocess.run(["bash", ROOT / "scripts" / "slurm-local.sh", "down"], check=False, timeout=120)


# Everything the setup script writes or reads as state. Over each an empty tmpfs, in new mount,
# network and pid namespaces: the machine looks as if SLURM had never been set up (the Debian
# packages, installed first, stay), the test's daemons cannot meet the module cluster's, and all die with the namespace.
FRESH_STATE = ["/etc/slurm", "/var/lib/slurm", "/var/lib/slurm-local", "/var/log/slurm", "/var/lib/mysql", "/run"]
FRESH_MACHINE = f"""set -euo pipefail
for d in {' '.join(FRESH_STATE)}; do mkdir -p "$d"; mount -t tmpfs tmpfs "$d"; done
# slurmdbd does not bind with loopback as the only interface (as on any real machine, give it one more)
ip link add sc0 type veth peer name sc1 && ip addr add 10.254.0.1/24 dev sc0 && ip link set sc1 up && ip link set sc0 up
ip link set lo up
bash {ROOT / 'scripts' / 'slurm-local.sh'} up
bash {ROOT / 'scripts' / 'slurm-local.sh'} up  # idempotent
test "$(ls /etc/slurm | sort | tr '\\n' ' ')" = "gres.conf slurm.conf slurmdbd.conf "
sinfo -h -o '%P %T %G'
job=$(sbatch --parsable --partition=gpu --gpus=1 --wait --wrap 'echo "gpu=$CUDA_VISIBLE_DEVICES"' --output=/run/job.out)
cat /run/job.out
for _ in $(seq 50); do state=$(sacct -X -n -P -j "$job" -o State); [[ $state == COMPLETED ]] && break; sleep 0.2; done
echo "sacct=$state"
"""


def test_cluster_setup_works_where_slurm_was_never_set_up():
    """`slurm-local.sh up` from empty /etc/slurm, state and database folders: a fresh CI machine."""
    if shutil.which("apt-get") is None or shutil.which("unshare") is None:
        pytest.fail("the fresh-machine SLURM test needs a Debian machine with unshare (util-linux)")
    # The packages come first, with the network (on a fresh CI machine none is installed); the
    # namespace below has no network, as the state it starts from has no SLURM.
    subprocess.run(["bash", ROOT / "scripts" / "slurm-local.sh", "install"], check=True, timeout=600)
    run = subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", FRESH_MACHINE],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = run.stdout.split("\n")
    assert "cpu* idle gpu:fake:2" in lines and "gpu idle gpu:fake:2" in lines, run.stdout
    assert "gpu=0" in lines and "sacct=COMPLETED" in lines, run.stdout
    assert "Permission denied" not in run.stderr, run.stderr[-3000:]


def snakemake_slurm(results: Path, *extra: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    cmd = ["snakemake", "--profile", "profiles/slurm", "--config", f"results={results}", *TEST_OVERRIDES, *extra]
    # A hung snakemake ignores SIGTERM at times (research notes): kill the group hard on timeout.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def accounting(since: str) -> pd.DataFrame:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", since, "--format=JobID,Comment%200,Partition,AllocTRES%200,State,ReqMem,AllocCPUS"],
                         check=True, capture_output=True, text=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line]
    table = pd.DataFrame(rows, columns=["job", "comment", "partition", "tres", "state", "mem", "cpus"])
    table["rule"] = table.comment.str.extract(r"^rule_(.+?)_wildcards")[0].fillna(table.comment.str.removeprefix("rule_"))
    return table


def masks(results: Path) -> dict[str, np.ndarray]:
    return {p.name: io.load_mask(p)[0] for p in sorted((results / "derivatives").rglob("*_msk.nii.gz"))}


def run_killing_one_fold_job(results: Path, manifest: Path, home: Path) -> tuple[subprocess.CompletedProcess, str | None]:
    """The demo cohort through SLURM with the README's short form, verbatim (its profile link made in a
    home of our own; the run's command, then the demo's cohort and models in place of the example's);
    the first predict_fold job seen running is killed, once.

    `scancel --batch --signal=KILL` kills the job's processes as the OOM killer or a dying node
    would (state FAILED). A plain `scancel` leaves the state "CANCELLED by <uid>", which
    snakemake-executor-plugin-slurm 2.8.0 does not recognise as failed: it waits forever.
    """
    link, command = slurm_short_form()
    env = {**os.environ, "HOME": str(home)}
    subprocess.run(["bash", "-c", link], cwd=ROOT, env=env, check=True)
    demo = ["--config", f"results={results}", f"manifest={manifest}", "batch_size=4",
            "semantic_model={path: demo}", "instance_model={path: demo}", "labeling_model={path: demo}"]  # fmt: skip
    cmd = [*shlex.split(command), *demo, *TEST_OVERRIDES]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    deadline = time.time() + 900
    while killed is None and time.time() < deadline and proc.poll() is None:
        running = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i|%k"], capture_output=True, text=True).stdout.split()
        fold = [line.split("|")[0] for line in running if "predict_fold" in line]
        if fold:
            subprocess.run(["scancel", "--batch", "--signal=KILL", fold[0]], check=True)
            killed = fold[0]
        time.sleep(1)
    try:
        out, _ = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:  # a hung snakemake ignores SIGTERM at times (research notes)
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out), killed


def one_subject_in_one_batch(demo_results: Path, out: Path) -> Path:
    """The demo's first subject (its three stations) as a manifest of one batch: every stage runs on the
    cluster once, and each of its masks must equal the local demo's."""
    from spinecohort import cohort

    manifest = demo_results / "demo" / "cohort.tsv"
    table = cohort.resolve_paths(cohort.read_manifest(manifest), manifest.parent)
    subset = table[table.subject == table.subject.iloc[0]].assign(batch="b0001")
    io.write_tsv(out, subset)
    return out


def test_demo_runs_on_slurm_like_locally_and_survives_a_killed_job(cluster, demo_local_run, tmp_path):
    """One run: the right partitions and requests per rule, a killed GPU job resubmitted by Snakemake's
    retry (attempt 2), and masks and scores equal to the local run's."""
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest = one_subject_in_one_batch(demo_local_run, tmp_path / "cohort.tsv")
    run, killed = run_killing_one_fold_job(tmp_path / "results", manifest, tmp_path / "home")
    assert killed, "no predict_fold job was seen running"
    assert run.returncode == 0, run.stdout[-3000:]
    jobs = accounting(since)
    assert list(jobs.state[jobs.job == killed]) == ["FAILED"], jobs
    assert set(jobs.state[jobs.job != killed]) == {"COMPLETED"}, jobs
    gpu_jobs = jobs[jobs.rule.isin(["predict_fold", "assemble_instances", "label_vertebrae"])]
    folds_done = gpu_jobs[(gpu_jobs.rule == "predict_fold") & (gpu_jobs.state == "COMPLETED")]
    assert len(folds_done) == 3  # one batch x three folds, the killed one redone
    assert (gpu_jobs.partition == "gpu").all() and gpu_jobs.tres.str.contains("gres/gpu=1").all()
    assert not jobs[~jobs.index.isin(gpu_jobs.index)].tres.str.contains("gres/gpu").any()
    n4 = jobs[jobs.rule == "bias_correct"]
    assert (n4.cpus == "2").all() and (n4.mem == "3000M").all() and (n4.partition == "cpu").all()
    scores = jobs[jobs.rule == "score"]
    assert (scores.cpus == "1").all() and (scores.mem == "2000M").all()

    cluster_masks = masks(tmp_path / "results")
    local = {name: array for name, array in masks(demo_local_run).items() if name in cluster_masks}
    # The three stations' semantic and vertebra masks, and the subject's stitched pair (whole_spine).
    assert local.keys() == cluster_masks.keys() and len(local) == 2 * 3 + 2
    for name, array in local.items():
        assert np.array_equal(array, cluster_masks[name]), name
    ours = pd.read_parquet(tmp_path / "results" / "scores").sort_values(["image_id", "structure", "metric"], ignore_index=True)
    theirs = pd.read_parquet(demo_local_run / "scores")
    theirs = theirs[theirs.image_id.isin(ours.image_id)].drop(columns="batch").sort_values(["image_id", "structure", "metric"], ignore_index=True)
    assert len(ours) > 0
    pd.testing.assert_frame_equal(ours.drop(columns="batch"), theirs, check_categorical=False)


def test_an_unknown_partition_fails_at_submission_with_slurms_message(cluster, tmp_path):
    run = snakemake_slurm(tmp_path, "--default-resources", "slurm_partition=nosuchpartition", "mem_mb=1000", "runtime=10",
                          "--until", "demo_cohort", timeout=300)
    assert run.returncode != 0
    assert "invalid partition" in run.stdout.lower(), run.stdout[-2000:]
