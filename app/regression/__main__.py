"""`python -m app.regression`: see `app.regression.cli`."""

import sys

from app.regression.cli import main

sys.exit(main())
