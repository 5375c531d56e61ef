"""Preemption and crashes under torchrun, delivered the way clusters deliver them.

- SIGTERM to the torchrun launcher (it forwards it to every worker, then kills them after its grace
  period) during a pp2 × dp2 × ep2 DualPipe run: the current step is checkpointed, no step is
  lost, and the resumed run is bit-identical to an uninterrupted one.
- SIGTERM straight to one worker: the others learn of it in the step's agreement all-reduce; one
  agreed checkpoint step, exit 143, torchrun restarts the group, bit-identical result (with
  asynchronous saves: the preemption save is waited for; the resume reads an async checkpoint).
- Chaos: under --max-restarts, seeded SIGKILLs of a random rank at 3 points (one while a checkpoint
  is being written) and one SIGTERM; the metrics equal the uninterrupted run's bit for bit, every
  step is logged once, and resume never picks a corrupt checkpoint. Replay a failure with
  CHAOS_SEED=<seed printed in the assertion>.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO_ROOT, TINY, read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, args: list[str], max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "launch.train", *TINY, *args]


def run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def logged_steps(run_dir) -> int:
    try:
        return len(read_metrics(str(run_dir)))
    except (FileNotFoundError, ValueError):
        return 0


def signal_after(cmd: list[str], run_dir, after_steps: int, target, timeout: int) -> tuple[int, str, str]:
    """Start `cmd`, wait until metrics.jsonl holds `after_steps` steps, send SIGTERM to
    target(launcher_pid) and return (exit code, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while logged_steps(run_dir) < after_steps:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
            time.sleep(0.05)
        os.kill(target(proc.pid), signal.SIGTERM)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def workers_of(launcher_pid: int) -> list[int]:
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        return sorted(int(p) for p in f.read().split())


def checkpoints(run_dir) -> list[str]:
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def assert_bit_identical(ref: list[dict], rows: list[dict], steps: int) -> None:
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "every step logged exactly once"
    for a, b in zip(ref, rows):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), (a["step"], a["loss"], b["loss"])


DUALPIPE = ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipe", "train.micro_batch=1"]


def test_sigterm_to_launcher_dualpipe_checkpoints_current_step(tmp_path):
    steps, seed = 6, int(os.environ.get("CHAOS_SEED", "0"))
    after = random.Random(seed).randint(2, steps - 2)
    ref = run(torchrun(4, [f"run.dir={tmp_path / 'ref'}", f"train.steps={steps}", *DUALPIPE]), timeout=400)
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = [f"run.dir={tmp_path / 'run'}", f"train.steps={steps}", *DUALPIPE]
    code, out, err = signal_after(torchrun(4, args), tmp_path / "run", after, lambda pid: pid, timeout=400)
    assert code != 0 and "Traceback" not in err.split("preempted:")[0], err[-3000:]
    saved = checkpoints(tmp_path / "run")
    logged = logged_steps(tmp_path / "run")
    assert len(saved) == 1 and saved[0] == f"step_{logged}" and logged >= after, (saved, logged, after)
    print(f"SIGTERM to torchrun after step {after}: checkpoint {saved[0]}, steps lost: {logged - int(saved[0][5:])}")
    resumed = run(torchrun(4, args), timeout=400)
    assert resumed.returncode == 0 and f"resumed from {tmp_path / 'run'}/checkpoints/{saved[0]}" in resumed.stdout
    assert_bit_identical(read_metrics(str(tmp_path / "ref")), read_metrics(str(tmp_path / "run")), steps)


EP2 = ["parallel.ep=2"]
STEPS, EVERY = 16, 3


@pytest.fixture(scope="module")
def ep2_reference(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("ref")
    res = run(torchrun(2, [f"run.dir={run_dir}", f"train.steps={STEPS}", *EP2]), timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    return read_metrics(str(run_dir))


def test_sigterm_to_one_worker_agrees_on_one_checkpoint_step(tmp_path, ep2_reference):
    seed = int(os.environ.get("CHAOS_SEED", "0"))
    rng = random.Random(seed)
    after = rng.randint(2, STEPS - 3)
    # Asynchronous saves here: the preemption checkpoint is waited for before the exit, and the
    # resumed run starts from an asynchronously written checkpoint.
    args = [f"run.dir={tmp_path}", f"train.steps={STEPS}", *EP2, "checkpoint.async_save=true", "checkpoint.every=4"]
    code, out, err = signal_after(torchrun(2, args, max_restarts=1), tmp_path, after,
                                  lambda pid: rng.choice(workers_of(pid)), timeout=400)
    assert code == 0, err[-3000:]
    resumed = [ln for ln in out.splitlines() if ln.startswith("resumed from")]
    assert len(resumed) == 1 and err.count("preempted: checkpoint") == 1, (out, err[-3000:])
    step = int(resumed[0].rsplit("step_", 1)[1])
    assert step >= after and f"checkpoints/step_{step} written" in err
    assert_bit_identical(ep2_reference, read_metrics(str(tmp_path)), STEPS)


def chaos_plan(seed: int) -> tuple[list[str], list[int]]:
    """Faults for attempts 0..3 (kill, kill, kill_in_checkpoint, term in a seeded order) and the
    checkpoint step each restart must resume from."""
    rng = random.Random(seed)
    kinds = ["kill", "kill", "kill_in_checkpoint", "term"]
    rng.shuffle(kinds)
    committed, faults, resumes = [0], [], []
    for attempt, kind in enumerate(kinds):
        start = committed[-1]
        # Small advances (at most two checkpoint intervals) leave room for the faults that follow.
        if kind == "kill_in_checkpoint":
            step = rng.choice([c for c in range(start + 1, min(start + 2 * EVERY, STEPS - 1) + 1) if c % EVERY == 0])
        else:
            step = rng.randint(start + 1, min(start + EVERY + 1, STEPS - 1))
        committed += [c for c in range(start + 1, step) if c % EVERY == 0]
        if kind == "term":
            committed.append(step)
        faults.append(f"{attempt}:{step}:{rng.randrange(2)}:{kind}")
        resumes.append(committed[-1])
    return faults, resumes


def test_chaos_random_kills_and_a_sigterm_give_the_uninterrupted_run(tmp_path, ep2_reference):
    seed = int(os.environ.get("CHAOS_SEED", "0"))
    faults, resumes = chaos_plan(seed)
    args = [f"run.dir={tmp_path}", f"train.steps={STEPS}", *EP2, f"checkpoint.every={EVERY}", "checkpoint.keep=2",
            f"debug.faults=[{','.join(faults)}]"]
    res = run(torchrun(2, args, max_restarts=len(faults)), timeout=600)
    where = f"CHAOS_SEED={seed} faults={faults}"
    assert res.returncode == 0, (where, res.stderr[-3000:])
    out = res.stdout + res.stderr
    for f in faults:
        assert f"debug: fault {f.split(':')[3]} at step {f.split(':')[1]}" in out, (where, f)
    assert "is unusable" not in out, (where, "a corrupt checkpoint was chosen on resume")
    chosen = [int(ln.rsplit("step_", 1)[1]) for ln in res.stdout.splitlines() if ln.startswith("resumed from")]
    assert chosen == [r for r in resumes if r > 0], (where, chosen, resumes)
    assert not [d for d in checkpoints(tmp_path) if not d.endswith(".tmp") and not
                os.path.exists(os.path.join(tmp_path, "checkpoints", d, "meta.json"))], where
    assert_bit_identical(ep2_reference, read_metrics(str(tmp_path)), STEPS)


def test_config_error_and_nonfinite_stop_are_one_line_from_one_rank(tmp_path):
    """Under torchrun every rank raises the same config error and the same agreed stop: one line."""
    for args, key in [(["train.foo=1"], "train.foo"), (["parallel.ep=3"], "parallel.ep")]:
        res = run(torchrun(2, [f"run.dir={tmp_path / 'bad'}", *args]), timeout=300)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        assert res.returncode != 0 and len(errors) == 1 and key in errors[0], res.stderr[-3000:]
    args = [f"run.dir={tmp_path / 'nan'}", "train.steps=5", *EP2, "checkpoint.every=2",
            "debug.inject_nonfinite_at_step=4", "debug.inject_nonfinite_rank=1"]
    res = run(torchrun(2, args), timeout=300)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode != 0 and len(errors) == 1, res.stderr[-3000:]
    name = res.stdout.split("gradient of ")[1].split(" at step")[0]
    assert "at step 4 on rank(s) 1;" in errors[0] and f"(rank 1): {name}." in errors[0], (errors, name)
    assert int(name.rsplit(".", 1)[1]) >= 4, "rank 1 holds routed experts 4..7 under ep=2: a global id"
    assert checkpoints(tmp_path / "nan") == ["step_2"], "the last good checkpoint stays the newest"
