"""The site worker of a source checkout: ``python -m workers.site_worker --site a
--dataset-id 901`` is ``fednnunet worker …``. The Celery wiring itself is
``fednnunet/workers/site_worker.py``, installed with the package (this folder is not)."""

import sys

from fednnunet.cli.main import app

if __name__ == "__main__":
    app(args=["worker", *sys.argv[1:]], prog_name="python -m workers.site_worker")
