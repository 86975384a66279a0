"""How a process was launched, checked before it does any work.

- Under `accelerate launch` (torchrun) the workers are children of the launcher. Killed with
  SIGKILL, a launcher cannot pass anything on, and its workers would go on training and writing
  checkpoints with nobody to stop them. Each worker asks Linux for SIGTERM when its parent dies
  (`prctl(PR_SET_PDEATHSIG)`), which the training loop treats as a pre-emption: every rank
  finishes its step, a checkpoint is saved, and they exit.
- `accelerate launch --cpu --num_processes 2` starts one process (accelerate issue #2741): it
  passes the rendezvous address for several but no rank or world size. That is said at once, with
  the command that does start two.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
CPU_LAUNCH = (
    "ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml -m vqar COMMAND ..."
)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def stop_with_the_launcher(signum: int = signal.SIGTERM) -> None:
    """Have this process receive `signum` when its parent (the launcher) dies; a no-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        return  # not permitted in some sandboxes: the old behaviour, no worse
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signum)


def single_process_launch_of_several() -> bool:
    """accelerate's simple launcher asked for several processes: a rendezvous address, no world size."""
    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_PORT" in os.environ
    return asked and "WORLD_SIZE" not in os.environ


def check_launch() -> None:
    """Refuse a launch that gave one process where several were asked for; under torchrun, stop with
    the launcher."""
    if single_process_launch_of_several():
        raise ValueError(
            "`accelerate launch --cpu --num_processes N` starts a single process (accelerate issue #2741); for N "
            f"processes on the CPU run: {CPU_LAUNCH}"
        )
    if launched_by_torchrun():
        stop_with_the_launcher()
