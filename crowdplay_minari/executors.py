"""Run independent tasks in a local process pool or on a Ray cluster, behind one interface.

The converter stages episodes with it and the benchmark runner runs grid cells with it:

    config = ExecutorConfig(kind="ray", workers=16, ray_address="auto")
    for item, outcome in run_tasks(stage_episode, jobs, config):
        if isinstance(outcome, TaskLost):
            ...  # the worker died (killed, out of memory) before returning
        else:
            ...  # what stage_episode returned

Tasks come back in the order they finish. A task that raises is a bug in it and is re-raised
here; a task whose *worker* is lost is yielded as `TaskLost`, so the caller can record or retry it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

Item = TypeVar("Item")

KINDS = ("local", "ray")


class ExecutorError(RuntimeError):
    """The executor itself cannot run (Ray missing, a bad configuration)."""


class TaskLost(Exception):
    """A task whose worker process died or whose Ray task failed before it returned."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ExecutorConfig:
    """Where tasks run."""

    kind: str = "local"
    """`local`: a pool of worker processes on this machine; `ray`: Ray tasks."""
    workers: int = 1
    """Tasks at once (local processes, or Ray tasks in flight beyond `prefetch`)."""
    ray_address: str | None = None
    """A Ray cluster to join; None starts a local Ray with `workers` CPUs."""
    start_method: str | None = None
    """multiprocessing start method of the local pool (None: the platform's default)."""
    initializer: Callable[[], None] | None = None
    """Run once in each local worker process."""
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 0
    """Ray: times a task whose worker died is retried before it is `TaskLost`."""
    prefetch: int = 0
    """Ray: extra tasks submitted beyond `workers`, so workers never wait for the driver."""
    env_vars: Mapping[str, str] = field(default_factory=dict)
    """Environment variables of Ray workers (local workers inherit this process's)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ExecutorError(f"executor must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.workers < 1:
            raise ExecutorError(f"workers must be at least 1, got {self.workers}")


def run_tasks(
    fn: Callable[[Any], Any],
    items: Iterable[Item],
    config: ExecutorConfig,
    *,
    prepare: Callable[[Item], Any] | None = None,
) -> Iterator[tuple[Item, Any]]:
    """`(item, fn(task) or TaskLost)` for every item, in the order they finish. The task is the
    item itself, or `prepare(item)` made just before it is submitted (so that, e.g., a file's
    bytes are read only while a bounded number of tasks are in flight)."""
    items = list(items)
    if not items:
        return iter(())
    prepare = prepare or _same
    if config.kind == "ray":
        return _run_ray(fn, items, config, prepare)
    return _run_local(fn, items, config, prepare)


def _same(item: Any) -> Any:
    return item


def _run_local(
    fn: Callable[[Any], Any],
    items: list[Item],
    config: ExecutorConfig,
    prepare: Callable[[Item], Any],
) -> Iterator[tuple[Item, Any]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # Even one worker is a child process, so 1 and n workers do the same work per task.
    context = multiprocessing.get_context(config.start_method)
    with ProcessPoolExecutor(
        min(config.workers, len(items)),
        mp_context=context,
        initializer=_start_worker,
        initargs=(config.initializer,),
    ) as pool:
        futures = {pool.submit(fn, prepare(item)): item for item in items}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except BrokenProcessPool as exc:
                outcome = TaskLost(f"worker process died (killed or out of memory?): {exc}")
            yield futures[future], outcome


def _start_worker(initializer: Callable[[], None] | None) -> None:
    """Each local worker ends itself when its parent dies. A worker blocked on its task queue
    never sees the parent go (it holds both ends of the pipe); left alive, it would keep what
    it inherited open, such as the converter's lock on the datasets root, so the rerun after a
    `kill -9` would find the root busy."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if initializer is not None:
        initializer()


def package_search_path() -> str:
    """The folder that holds the `crowdplay_minari` package (a checkout or site-packages)."""
    import crowdplay_minari

    return str(Path(crowdplay_minari.__file__).resolve().parent.parent)


def _run_ray(
    fn: Callable[[Any], Any],
    items: list[Item],
    config: ExecutorConfig,
    prepare: Callable[[Item], Any],
) -> Iterator[tuple[Item, Any]]:
    try:
        import ray
    except ImportError as exc:
        raise ExecutorError(
            "the ray executor needs Ray: pip install 'crowdplay-minari[ray]'"
        ) from exc
    env_vars = dict(config.env_vars)
    # Workers import the same code as the driver, from a checkout or an installed wheel.
    env_vars["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_search_path(), env_vars.get("PYTHONPATH")) if p
    )
    started_here = not ray.is_initialized()
    environ = dict(os.environ)  # ray.init sets variables (RAY_AUTH_MODE ...): put them back
    if started_here:
        ray.init(
            address=config.ray_address,
            num_cpus=None if config.ray_address else config.workers,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env_vars},
        )
    remote = ray.remote(
        num_cpus=config.cpus_per_task,
        num_gpus=config.gpus_per_task,
        max_retries=config.max_retries,
    )(fn)
    queue, running = list(items), {}
    limit = config.workers + config.prefetch
    try:
        while queue or running:
            while queue and len(running) < limit:
                item = queue.pop(0)
                running[remote.remote(prepare(item))] = item
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                item = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise exc.as_instanceof_cause() from None  # the task's own bug
                except ray.exceptions.RayError as exc:
                    outcome = TaskLost(f"Ray task failed: {exc}")
                yield item, outcome
    finally:
        if started_here:
            ray.shutdown()
            _restore_environ(environ)


def _restore_environ(saved: dict[str, str]) -> None:
    """Undo what a library changed in `os.environ` (the package leaves the environment as it
    found it)."""
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
