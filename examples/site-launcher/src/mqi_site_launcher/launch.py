"""The site launcher: ``python -m mqi_site_launcher.launch --progress-file F [--label L] -- COMMAND``.

Runs COMMAND with /bin/sh, copies its output to stdout and writes ``i N`` to the progress
file whenever the simulator prints ``Generating particles for (i of N batches)``. Exits
with the command's exit code.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from mqi_framework.toolkit import write_atomic

BATCH = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m mqi_site_launcher.launch --progress-file F [--label L] -- COMMAND", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="mqi_site_launcher.launch")
    parser.add_argument("--progress-file", type=Path, required=True)
    parser.add_argument("--label", default="site")
    args = parser.parse_args(argv[:split])
    command = " ".join(argv[split + 1:])
    print(f"[{args.label} launcher] starting", flush=True)
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        match = BATCH.search(line)
        if match:
            # a progress counter is cheap to lose: no fsync per batch
            write_atomic(args.progress_file, f"{match.group(1)} {match.group(2)}\n", durable=False)
    code = proc.wait()
    print(f"[{args.label} launcher] exit code {code}", flush=True)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
