"""``mope.fix_task``: pin task-level routing to one task, so the mixture becomes one fixed update.

With ``routing_level='task'`` a router's gate weights depend only on the task id (the gate of
one column of its ``[N, num_tasks]`` logit table), so for one given task they are constants and
the experts fold into the base weights exactly. Without a fixed task they depend on the input
(the ``task_ids`` of each forward) and merging is refused.

    mope.fix_task(model, 2)                  # from now on: task 2 (forwards may omit task_ids)
    merged = model.merge_and_unload()        # exact for task 2

    with mope.fix_task(model, 2):            # or only inside the block
        bundle = mope.export_lora(model, "out/task2")

Forwards that pass ``task_ids`` still use them; the fixed task is the default when they do not. Once
merged, the base weights hold the fixed task's update and a forward's ``task_ids`` change nothing.
A merge remembers the gate it used, so ``unmerge`` is exact even after the task is released.
"""

from __future__ import annotations

from torch import nn

from ..layer import MoPELayer


class FixedTask:
    """Sets ``fixed_task`` on the routers now; as a context manager, restores the previous values on exit."""

    def __init__(self, model: nn.Module, task_id: int, adapter_name: str | None = None) -> None:
        routers = task_routers(model, adapter_name)
        if not routers:
            which = f"adapter '{adapter_name}' of this model has" if adapter_name is not None else "this model has"
            raise ValueError(
                f"fix_task: {which} no routing_level='task' router to fix (none at all after merge_and_unload or "
                "unload, which remove the adapter)."
            )
        num_tasks = min(router.weight.shape[-1] for router in routers)
        if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < num_tasks:
            raise ValueError(f"fix_task: task_id must be an int in [0, num_tasks={num_tasks}), got {task_id!r}.")
        self.previous = [(router, router.fixed_task) for router in routers]
        for router in routers:
            router.fixed_task = task_id

    def release(self) -> None:
        for router, previous in self.previous:
            router.fixed_task = previous

    def __enter__(self) -> FixedTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def task_routers(model: nn.Module, adapter_name: str | None = None) -> list[nn.Module]:
    """Every task-level router of ``adapter_name`` (all adapters if None), each once."""
    found: dict[int, nn.Module] = {}
    for layer in model.modules():
        if not isinstance(layer, MoPELayer):
            continue
        for name, router in layer.mope_router.items():
            if (adapter_name is None or name == adapter_name) and router.level.name == "task":
                found[id(router)] = router
    return list(found.values())


def fix_task(model: nn.Module, task_id: int, adapter_name: str | None = None) -> FixedTask:
    """Route every example of ``model`` as task ``task_id`` (when no ``task_ids`` are given), making it mergeable."""
    return FixedTask(model, task_id, adapter_name)
