"""Jobs side by side in worker processes, one per CPU core, each pinned to its core.

On CPU the small models of a study keep two cores only partly busy: two jobs in two
processes, one core each, finish sooner than the same jobs one after the other on both.

Ctrl-C (SIGINT to this process; the workers are in their own process group, so a terminal's
Ctrl-C reaches this process only): the first is passed on once to each worker, whose training
stage finishes its step and saves a checkpoint (calm_jax.trainer); the jobs not started are
cancelled, the finished ones kept (done() is called for each), and `Interrupted` is raised
once every worker has stopped. A second Ctrl-C is passed on too: the workers stop at once.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable, Sequence

import jax
from tqdm.auto import tqdm

from calm_jax.experiment.stages import Timer


def default_workers(jobs: int) -> int:
    """One worker process per usable CPU core (at most `jobs`) on CPU; 1 on an accelerator."""
    if jax.default_backend() != "cpu":
        return 1
    return max(1, min(jobs, len(usable_cores())))


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def core_sets(workers: int) -> list:
    """Disjoint CPU core lists, one per worker (None each: not pinned, when not on CPU)."""
    if jax.default_backend() != "cpu" or not hasattr(os, "sched_setaffinity"):
        return [None] * workers
    cores = usable_cores()
    if workers > len(cores):
        raise ValueError(f"{workers} workers asked for, but this process may use only {len(cores)} CPU cores")
    return [cores[i * len(cores) // workers:(i + 1) * len(cores) // workers] for i in range(workers)]


class Interrupted(KeyboardInterrupt):
    """run_jobs stopped by Ctrl-C: `finished` jobs were kept, `stopped` ones saved where they were."""

    def __init__(self, kind: str, finished: list, stopped: list):
        super().__init__(f"{kind}: {len(finished)} job(s) finished and kept"
                         + (f", {', '.join(stopped)} stopped (their training saved at the step reached)"
                            if stopped else ""))
        self.finished, self.stopped = finished, stopped


def run_jobs(kind: str, names: Sequence[str], job: Callable, setup: Callable, workers: int, timer, done: Callable,
             logs: str, order: Sequence[str] | None = None, context=None) -> None:
    """done(name, job(context, name)) for every name.

    workers <= 1: in this process, one after the other, with `context` (or setup() when None).
    Otherwise in `workers` spawned processes, each pinned to its own CPU cores, started in
    `order` (default: `names`; put the longest first). Each worker calls setup() once (job,
    setup: picklable, e.g. module-level functions or functools.partial of them) and writes
    its output, Python's and the runtime's, to LOGS/<name>.log. A failed job raises
    RuntimeError naming the job and its log; the jobs not started yet are cancelled.
    """
    if workers <= 1:
        context = setup() if context is None else context
        for name in names:
            with timer.stage(name):
                result = job(context, name)
            done(name, result)
        return
    cores = core_sets(workers)
    print(f"{kind}: {len(names)} jobs in {workers} worker processes"
          + (f" (cores {', '.join(map(str, cores))})" if cores[0] is not None else "")
          + f"; the output of each: {logs}/<name>.log", flush=True)
    mp = multiprocessing.get_context("spawn")  # a forked JAX runtime is not safe to use
    queue = mp.Queue()
    for c in cores:
        queue.put(c)
    interrupts, pool = [], None

    def on_sigint(signum, frame):
        interrupts.append(signum)
        print(f"{kind}: Ctrl-C: " + ("the workers finish their step and save; jobs not started are cancelled "
                                     "(Ctrl-C again to stop them at once)" if len(interrupts) == 1
                                     else "stopping the workers at once"), flush=True)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            try:
                os.kill(process.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    finished, stopped = [], []
    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=mp, initializer=_worker_init,
                                                    initargs=(queue,)) as pool, \
                tqdm(total=len(names), desc=kind, unit="job", dynamic_ncols=True) as bar:
            futures = {pool.submit(_worker_job, job, setup, name, os.path.join(logs, f"{name}.log")): name
                       for name in (order or names)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    name = futures[future]
                    if future.cancelled():
                        continue
                    try:
                        result, seconds = future.result()
                    except (KeyboardInterrupt, concurrent.futures.process.BrokenProcessPool):
                        if not interrupts:
                            raise
                        stopped.append(name)
                        continue
                    except Exception as e:
                        raise RuntimeError(f"{kind} job {name!r} failed: {type(e).__name__}: {e} "
                                           f"(its output: {os.path.join(logs, name + '.log')})") from e
                    finished.append(name)
                    timer.seconds[name] = seconds
                    bar.update(1)
                    bar.set_postfix_str(name)
                    with tqdm.external_write_mode():  # done() prints a line; keep it off the bar's
                        done(name, result)
                    if interrupts:
                        pool.shutdown(wait=False, cancel_futures=True)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the jobs not started yet; running ones finish (resumable)
                raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupts:
        raise Interrupted(kind, finished, stopped)


def _worker_init(queue) -> None:
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent only, which passes it on once
    signal.signal(signal.SIGINT, _idle_sigint)
    cores = queue.get()
    if cores is not None:
        os.sched_setaffinity(0, cores)  # before JAX starts, so that its thread pools match
    os.environ.setdefault("TQDM_MININTERVAL", "10")  # bars go to a log file: a line per 10 s


_CONTEXTS: dict = {}  # per worker process: setup()'s result, by setup
_BUSY: list = []  # a worker process: non-empty while it runs a job


def _idle_sigint(signum, frame):
    """A worker's SIGINT outside the trainer (which catches its own): stops a running job at
    once; an idle worker has nothing to stop (the pool's shutdown ends it)."""
    if _BUSY:
        raise KeyboardInterrupt


def _worker_job(job, setup, name: str, log: str):
    """One job in a worker process, its output (Python's and the runtime's) into `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.makedirs(os.path.dirname(log), exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _BUSY.append(name)
    try:
        if setup not in _CONTEXTS:
            _CONTEXTS[setup] = setup()
        timer = Timer()
        with timer.stage(name):
            result = job(_CONTEXTS[setup], name)
        return result, timer.seconds[name]
    finally:
        _BUSY.clear()
        sys.stdout.flush()
        sys.stderr.flush()
