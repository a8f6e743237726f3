"""`python -m src.sweep CONFIG --space SPACE --trials N [flags]` (src/sweep/command.py)."""

import sys

from src.sweep.command import main

sys.exit(main())
