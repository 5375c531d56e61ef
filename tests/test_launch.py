"""launch/torchrun.sh (env / SLURM resolution, --dry-run) and Hydra -m sweeps run under torchrun."""
from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, TINY, read_metrics

SCRIPT = os.path.join(REPO_ROOT, "launch", "torchrun.sh")


# ---------------------------------------------------------------------------------------------
# torchrun.sh --dry-run


@pytest.fixture
def bindir(tmp_path):
    """A PATH holding only what the script needs, so a host's scontrol / nvidia-smi / torchrun
    cannot leak into the cases; tests add fakes."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in ("bash", "sed", "grep", "dirname"):
        found = shutil.which(tool)
        assert found, tool
        os.symlink(found, d / tool)
    return d


def fake(bindir, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!" + shutil.which("bash") + "\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def dry_run(bindir, env: dict, args=("model=toy", "run.dir=runs/a b")) -> tuple[int, list[str], str]:
    full = {"PATH": str(bindir), "TORCHRUN": "torchrun", **env}
    res = subprocess.run([shutil.which("bash"), SCRIPT, "--dry-run", *args], env=full, capture_output=True,
                         text=True, timeout=30)
    lines = res.stderr.strip().splitlines()
    return res.returncode, (shlex.split(lines[-1]) if res.returncode == 0 else []), res.stderr


def opts(cmd: list[str]) -> dict:
    """--flag value pairs of the torchrun part (before -m)."""
    head = cmd[:cmd.index("-m")]
    out, i = {}, 1
    while i < len(head):
        if i + 1 < len(head) and not head[i + 1].startswith("--"):
            out[head[i]] = head[i + 1]
            i += 2
        else:
            out[head[i]] = True
            i += 1
    return out


def test_dry_run_defaults_single_node_standalone(bindir):
    rc, cmd, err = dry_run(bindir, {})
    assert rc == 0, err
    assert cmd[0] == "torchrun"
    assert opts(cmd) == {"--standalone": True, "--nnodes": "1", "--nproc_per_node": "1", "--max-restarts": "0"}
    assert cmd[cmd.index("-m"):] == ["-m", "launch.train", "model=toy", "run.dir=runs/a b"]


def test_dry_run_torchrun_env_multi_node(bindir):
    env = {"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
           "NPROC_PER_NODE": "8", "MAX_RESTARTS": "2"}
    rc, cmd, err = dry_run(bindir, env)
    assert rc == 0, err
    assert opts(cmd) == {"--nnodes": "4", "--node_rank": "3", "--master_addr": "10.0.0.1", "--master_port": "1234",
                         "--nproc_per_node": "8", "--max-restarts": "2"}


def test_dry_run_slurm_uses_scontrol(bindir):
    fake(bindir, "scontrol", '[[ "$1 $2 $3" == "show hostnames gpu[003-004]" ]] || exit 9; echo gpu003; echo gpu004')
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_GPUS_ON_NODE": "4"}
    rc, cmd, err = dry_run(bindir, env)
    assert rc == 0, err
    assert opts(cmd) == {"--nnodes": "2", "--node_rank": "1", "--master_addr": "gpu003", "--master_port": "29500",
                         "--nproc_per_node": "4", "--max-restarts": "0"}


@pytest.mark.parametrize("nodelist,master", [("gpu[007-010,012],cpu1", "gpu007"), ("nodeA,nodeB", "nodeA"),
                                             ("solo", "solo")])
def test_dry_run_slurm_nodelist_without_scontrol(bindir, nodelist, master):
    rc, cmd, err = dry_run(bindir, {"SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0", "SLURM_NODELIST": nodelist})
    assert rc == 0, err
    assert opts(cmd)["--master_addr"] == master and opts(cmd)["--nnodes"] == "2"


def test_dry_run_env_beats_slurm_and_gpu_count(bindir):
    fake(bindir, "nvidia-smi", 'echo "GPU 0: H100 (UUID: a)"; echo "GPU 1: H100 (UUID: b)"; echo "GPU 2: H100 (UUID: c)"')
    slurm = {"SLURM_NNODES": "8", "SLURM_NODEID": "5", "SLURM_JOB_NODELIST": "n[1-8]"}
    rc, cmd, err = dry_run(bindir, {**slurm, "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "head"})
    assert rc == 0, err
    o = opts(cmd)
    assert (o["--nnodes"], o["--node_rank"], o["--master_addr"], o["--nproc_per_node"]) == ("2", "0", "head", "3")
    # one node with an explicit MASTER_ADDR: a real rendezvous there, not --standalone
    rc, cmd, err = dry_run(bindir, {"MASTER_ADDR": "head"})
    assert rc == 0 and "--standalone" not in cmd and opts(cmd)["--master_addr"] == "head", err


@pytest.mark.parametrize("env,msg", [({"NNODES": "2"}, "MASTER_ADDR"),
                                     ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK"),
                                     ({"NPROC_PER_NODE": "four"}, "NPROC_PER_NODE")])
def test_dry_run_bad_env_is_one_line_error(bindir, env, msg):
    rc, _, err = dry_run(bindir, env)
    assert rc == 2 and err.strip().startswith("torchrun.sh: error:") and msg in err, err


# ---------------------------------------------------------------------------------------------
# Hydra multirun sweeps


def sweep(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launch.train", "-m", *TINY, "train.steps=2", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def table_rows(stdout: str) -> dict[int, str]:
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("job ") and "status" in ln)
    return {int(ln.split()[0]): ln for ln in lines[start + 2:] if ln.strip() and ln.split()[0].isdigit()}


def test_sweep_jobs_run_under_torchrun_with_own_run_dirs(tmp_path):
    res = sweep(["train.lr=1e-3,3e-3", "launch.nproc_per_node=2", "parallel.ep=2", f"run.dir={tmp_path}"], timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for job in (0, 1):
        recs = read_metrics(str(tmp_path / str(job)))
        assert [r["step"] for r in recs] == [1, 2]
    assert "(torchrun, 2 ranks)" in res.stdout
    rows = table_rows(res.stdout)
    assert sorted(rows) == [0, 1], res.stdout
    assert "train.lr=0.001" in rows[0] and "train.lr=0.003" in rows[1]
    assert all(r.rstrip().endswith("ok") and f"{tmp_path}/{j}" in r for j, r in rows.items())
    assert rows[0].split()[3] == "2"  # final step
    assert (tmp_path / "summary.txt").read_text().strip() == "\n".join(
        res.stdout.strip().splitlines()[-4:])
    # the same table again from the saved rows
    again = subprocess.run([sys.executable, "-m", "launch.sweep", str(tmp_path)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == (tmp_path / "summary.txt").read_text().strip()


def test_sweep_failed_job_is_a_row_and_the_sweep_goes_on(tmp_path):
    # launch.nproc_per_node=1: jobs run in-process; ep=3 is a layout error (exit code 2) in job 0.
    res = sweep(["parallel.ep=3,1", f"run.dir={tmp_path}"], timeout=180)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "error: parallel.ep=3" in res.stderr
    rows = table_rows(res.stdout)
    assert rows[0].rstrip().endswith("failed (rc=2)") and "parallel.ep=3" in rows[0]
    assert rows[1].rstrip().endswith("ok") and "parallel.ep=1" in rows[1]
    assert [r["step"] for r in read_metrics(str(tmp_path / "1"))] == [1, 2]
    assert not (tmp_path / "0" / "metrics.jsonl").exists()


def test_table_format_and_swept_keys():
    from launch.sweep import format_table, swept_keys_of

    assert swept_keys_of(["model=tiny", "train.lr=1e-3,3e-3", "+x=choice(1,2)", "train.steps=2"]) == ["train.lr", "x"]
    assert swept_keys_of(["model=tiny"]) is None
    rows = [{"job": 0, "overrides": "train.lr=0.001", "run_dir": "r/0", "final_step": 10, "final_loss": 2.5,
             "lm_loss_last10": 2.25, "tokens_per_s_median": 1234.4, "status": "ok", "rc": 0},
            {"job": 1, "overrides": "train.lr=0.003", "run_dir": "r/1", "final_step": None, "final_loss": None,
             "lm_loss_last10": None, "tokens_per_s_median": None, "status": "failed (rc=1)", "rc": 1}]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:2] == ["job", "overrides"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["0", "train.lr=0.001", "r/0", "10", "2.5000", "2.2500", "1234", "ok"]
    assert lines[3].split() == ["1", "train.lr=0.003", "r/1", "-", "-", "-", "-", "failed", "(rc=1)"]
