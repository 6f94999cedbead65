"""Where the host's CPU goes during a benchmark level: cores used per role of process (Linux /proc).

On a GPU host the cores feed the GPU, and each role is a process or a few (the shim's workers, Triton's tokenizer
stubs, the load generator): a role whose busiest process uses a whole core is what caps the throughput, whatever
the GPU could do. A role is named from the command line, and a process started by ``multiprocessing``'s spawn takes
its parent's role with " worker" added (uvicorn's workers under ``fos serve --workers``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# Command-line fragments, first match wins: the roles of the project's own servers and tools.
_ROLES = (
    ("triton_python_backend_stub", "triton stub"),
    ("tritonserver", "tritonserver"),
    ("shim.cli serve", "fos serve"),
    ("fos serve", "fos serve"),
    ("shim.cli bench", "fos bench"),
    ("fos bench", "fos bench"),
    ("bench.naive_server", "naive server"),
)


@dataclasses.dataclass(frozen=True)
class Proc:
    role: str
    seconds: float  # user + system CPU time so far
    # That of its children that ended and were waited for: a load generator's pool lives within one level, gone by
    # its end. Counted in the role's cores, not as a process of its own.
    children: float = 0.0


def role_of(cmdline: list[str], parent_role: str | None) -> str | None:
    text = " ".join(cmdline)
    for fragment, role in _ROLES:
        if fragment in text:
            if role == "triton stub":  # the model it serves: .../<model>/<version>/model.py
                model = next((Path(a).parent.parent.name for a in cmdline if a.endswith("model.py")), "?")
                return f"triton stub {model}"
            return role
    if parent_role and "multiprocessing" in text and "spawn" in text:
        return parent_role if parent_role.endswith(" worker") else f"{parent_role} worker"
    return None


def snapshot(proc: Path = Path("/proc")) -> dict[int, Proc]:
    """Every process with a role, by pid. Empty where there is no /proc."""
    raw: dict[int, tuple[int, list[str], list[float]]] = {}
    for entry in proc.glob("[0-9]*"):
        try:
            cmdline = [a for a in (entry / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        raw[int(entry.name)] = (int(fields[1]), cmdline, [int(f) / _TICK for f in fields[11:15]])
    roles: dict[int, str | None] = {}

    def resolve(pid: int, depth: int = 0) -> str | None:
        if pid not in roles:
            ppid, cmdline, _ = raw[pid]
            parent = resolve(ppid, depth + 1) if ppid in raw and depth < 8 else None
            roles[pid] = role_of(cmdline, parent)
        return roles[pid]

    out = {}
    for pid, (_, _, (user, system, child_user, child_system)) in raw.items():
        role = resolve(pid)
        if role:
            out[pid] = Proc(role, user + system, child_user + child_system)
    return out


def usage(before: dict[int, Proc], after: dict[int, Proc], seconds: float) -> dict[str, dict[str, float]]:
    """Per role over ``seconds``: cores used in all (ended children included), its live process count, and its busiest
    process's cores (1.0: that process had a core to itself the whole time, and waits on nothing but its own work)."""
    own: dict[str, list[float]] = {}
    ended: dict[str, float] = {}
    for pid, now in after.items():
        then = before.get(pid)
        if then is None or then.role != now.role:  # started meanwhile (or a reused pid): all of it is new
            then = Proc(now.role, 0.0, 0.0)
        own.setdefault(now.role, []).append((now.seconds - then.seconds) / seconds)
        ended[now.role] = ended.get(now.role, 0.0) + (now.children - then.children) / seconds
    return {
        role: {"cores": round(sum(c) + ended[role], 3), "processes": len(c), "busiest": round(max(c), 3)}
        for role, c in sorted(own.items())
    }


def describe(roles: dict[str, dict[str, float]]) -> str:
    def one(role: str, u: dict[str, float]) -> str:
        many = f" ({u['processes']:.0f} processes, busiest {u['busiest']:.2f})" if u["processes"] > 1 else ""
        return f"{role} {u['cores']:.2f}{many}"

    return "; ".join(one(role, u) for role, u in roles.items())
