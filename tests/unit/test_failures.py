"""What a cluster does to a run, as the one line each failure becomes (launcher/runtime/failures.py)."""

from __future__ import annotations

import errno
import os

import pytest

from launcher.runtime.failures import (
    DISK_FULL_EXIT_CODE,
    RESTART_EXIT_CODE,
    disk_full,
    lost_contact,
    worker_lost,
)


def test_a_peer_gone_under_gloo_or_nccl_is_one_line_and_other_errors_are_left_alone():
    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:41234: "
        "Connection reset by peer"
    )
    lost = lost_contact(gloo, rank=1, step=37)
    assert str(lost) == (
        "rank 1: lost contact with the other processes at step 37 (connection reset by peer): "
        "another process ended; see its log"
    )
    assert lost.exit_code == RESTART_EXIT_CODE and lost.hard_exit
    assert lost_contact(RuntimeError("NCCL communicator was aborted on rank 0"), 0, 3) is not None
    assert lost_contact(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 0, 3) is None
    assert lost_contact(ValueError("Connection reset by peer"), 0, 3) is None  # not a collective's error


@pytest.mark.parametrize(
    "said, cause",
    [
        ("Killed", "killed by SIGKILL, most likely by the kernel's out-of-memory killer"),
        ("Terminated", "ended by SIGTERM, sent to all of its rank's processes"),
        ("Segmentation fault", "killed by SIGSEGV: a crash in the dataset's code"),
    ],
)
def test_a_dead_dataloader_worker_is_named_with_its_split_index_and_likely_cause(said, cause):
    error = RuntimeError(f"DataLoader worker (pid 4242) is killed by signal: {said}. ")
    lost = worker_lost(error, rank=1, step=12, workers={4242: ("training", 1)})
    assert str(lost).startswith(
        f"rank 1: DataLoader worker 1 (pid 4242) of the training data ended at step 12: {cause}"
    )
    assert lost.exit_code == RESTART_EXIT_CODE
    assert (
        worker_lost(RuntimeError("DataLoader worker (pid(s) 77) exited unexpectedly"), 0, 1, {}) is not None
    )
    assert worker_lost(RuntimeError("CUDA out of memory"), 0, 1, {}) is None


def test_a_full_disk_is_recognised_from_the_os_and_from_safetensors(tmp_path):
    path = str(tmp_path / ".tmp-step-00000020")
    full = disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)
    assert full.exit_code == DISK_FULL_EXIT_CODE
    assert str(full).startswith(f"no space left writing checkpoint {path} (") and "MiB free there)" in str(
        full
    )
    wrapped = Exception(
        "Error while serializing: "
        'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )
    assert disk_full(wrapped, path) is not None
    assert disk_full(OSError(errno.EACCES, "Permission denied"), path) is None
    assert disk_full(RuntimeError("file write failed"), path) is None  # torch.save's words, with space left


def test_a_worker_lost_mid_handover_after_this_rank_got_sigterm_is_put_down_to_the_sigterm():
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError as error:
        raised = error
    assert worker_lost(raised, 0, 5, {}) is None  # not from a DataLoader: some other connection
    from torch.utils.data import DataLoader

    def broken(_):
        raise ConnectionResetError(104, "Connection reset by peer")

    try:
        next(iter(DataLoader([0], collate_fn=broken)))
    except ConnectionResetError as error:
        raised = error
    assert "most likely killed by the kernel's out-of-memory killer" in str(worker_lost(raised, 0, 5, {}))
    assert "ended by SIGTERM, sent to all of its rank's processes" in str(
        worker_lost(raised, 0, 5, {}, terminated=True)
    )
