"""`python -m medtriage.cli ...`, the same as the `medtriage` command."""

import sys

from medtriage.cli import main

sys.exit(main())
