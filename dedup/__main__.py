"""`python -m dedup`: the standalone SSCD dedup command (the same as `flowcurate dedup`)."""

import sys

from dedup.cli import main

sys.exit(main())
