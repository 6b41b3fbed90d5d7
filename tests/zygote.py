"""A pre-warmed process that runs entry scripts for the tests, one forked child per run.

Every script of the toolkit spends ~8 s of a 2-core machine importing torch, diffusers and
transformers before it does anything; the suite starts well over a hundred of them. This server
imports those libraries once, then for each request forks: the child is a fresh copy of the warm
interpreter that runs the script as ``__main__`` with its own argv, stdout/stderr files and exit
code, exactly as ``python script.py ...`` would (the project's own modules are imported in the
child, so they are always the checked-out code). The parent is :func:`tests.train_helpers.run_script`.

Protocol, one JSON object per line: request ``{"script", "args", "env", "stdout", "stderr"}`` on stdin,
reply ``{"pid"}`` once forked, then ``{"returncode"}`` once the child ended. No torch operation
runs here before forking, so no OpenMP thread pool is copied into the children.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _warm_up() -> None:
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401 (diffusers imports lazily)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def _child(request: dict) -> None:
    """Runs in the forked child; never returns."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()  # the caller's environment at the time of the call, as for a fresh process
    os.environ.update(request["env"])
    script = os.path.join(REPO, request["script"])
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(script)
    os.chdir(REPO)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # what the interpreter does with an uncaught SystemExit
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback and status 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # the script's own exit handlers (trackers, log files)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    _warm_up()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            _child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    main()
