"""`python -m app.experiment`: see `app.experiment.cli`."""

import sys

from app.experiment.cli import main

sys.exit(main())
