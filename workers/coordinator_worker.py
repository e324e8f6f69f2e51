"""The coordinator of a source checkout: ``python -m workers.coordinator_worker`` is
``fednnunet coordinator …``. The Celery wiring itself is
``fednnunet/workers/coordinator_worker.py``, installed with the package (this folder is not)."""

import sys

from fednnunet.cli.main import app

if __name__ == "__main__":
    app(args=["coordinator", *sys.argv[1:]], prog_name="python -m workers.coordinator_worker")
