"""How this process was started, for the lines that name a command to run next the same way: ``zoo``, or torchrun
with the job's process counts, read from the environment torchrun sets (``io.resume_command`` spells the command)."""
from __future__ import annotations

import os

from finetune.core.host import launcher_count

__all__ = ["zoo_launch"]


def zoo_launch() -> tuple[str, ...]:
    """The words that start ``zoo`` as this process was started: ``zoo``, outside torchrun (no TORCHELASTIC_RUN_ID,
    or one process: WORLD_SIZE 1); under torchrun on one machine ``torchrun --nproc-per-node N -m zoo``, N its
    process count (LOCAL_WORLD_SIZE; a resume on another count is accepted, and takes the same steps).
    On several machines (WORLD_SIZE above LOCAL_WORLD_SIZE) the environment does not tell the rendezvous the job was
    started with (MASTER_ADDR/MASTER_PORT are the store torchrun set up, not its options): the words name the
    machines' count, this machine's process count and a c10d rendezvous whose endpoint is left to fill in,
    ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` (one machine's address and a free port), the command that
    each machine runs; machines of unequal process counts each give their own."""
    world, local = launcher_count("WORLD_SIZE"), launcher_count("LOCAL_WORLD_SIZE")
    if not os.environ.get("TORCHELASTIC_RUN_ID") or world <= 1:
        return ("zoo",)
    nodes = -(-world // local)
    several = ("--nnodes", str(nodes)) if nodes > 1 else ()
    rendezvous = ("--rdzv-backend", "c10d", "--rdzv-endpoint", "HOST:PORT") if nodes > 1 else ()
    return ("torchrun", *several, "--nproc-per-node", str(local), *rendezvous, "-m", "zoo")
