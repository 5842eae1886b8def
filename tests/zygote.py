"""A process that imports the launcher and its dependencies once, then forks a fresh child for each
single-process CLI run the tests ask for: each run is still a process of its own (its own exit
code, stdout and stderr, killed alone on a timeout), without the seconds of importing torch,
torchvision and Accelerate again. It holds no thread when it forks, so a child
starts as clean as `python -m launcher` would.

Protocol, one JSON line each way on stdin/stdout: `{"argv", "cwd", "env", "stdout", "stderr"}`
in; `{"pid"}` once the child runs, then `{"code"}` when it has ended. "ready" first, or
"threads: N" if importing started threads (the tests then use plain subprocesses).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import traceback


def warm() -> None:
    """What every run imports (the CLI, the trainer, the commands)."""
    import launcher.cli  # noqa: F401
    import launcher.commands.inference  # noqa: F401
    import launcher.train.trainer  # noqa: F401


def child(request: dict) -> None:
    """In the forked child: become the run, then end with its exit code."""
    code = 1
    try:
        os.setsid()  # a session of its own, as the tests' subprocesses have
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(request["cwd"])
        # as `python -m launcher` has it: recipes import from the working directory
        sys.path[0] = request["cwd"]
        os.environ.clear()
        os.environ.update(request["env"])
        random.seed()  # a fresh process's `random` (temporary names) differs from its siblings'
        sys.argv = ["launcher", *request["argv"]]
        from launcher.cli import main

        try:
            code = main(request["argv"]) or 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # noqa: BLE001 - as the interpreter would: a traceback and exit 1
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    sys.path[0] = os.getcwd()  # not this file's directory: the children run as `python -m launcher` would
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    warm()
    if threading.active_count() != 1:
        replies.write(f"threads: {threading.active_count()}\n")
        return
    replies.write("ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            replies.close()
            child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
