"""Worker of tests/test_train_loop.py: `python -m fewstep_jax.main ...` with each batch slowed
down (and announced on stdout as "batch i"), so the test can SIGKILL it mid-run.

Usage: slow_train_teacher.py SLEEP_S -- <fewstep_jax.main flags>
"""

import sys
import time

from fewstep_jax import main
from fewstep_jax.data import sources

SLEEP = float(sys.argv[1])
_batch = sources.SamplerSource.batch


def slow_batch(self, step):
    print(f"batch {step}", flush=True)
    time.sleep(SLEEP)
    return _batch(self, step)


sources.SamplerSource.batch = slow_batch

if __name__ == "__main__":
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    main.run()
