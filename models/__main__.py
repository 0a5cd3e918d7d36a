import sys

from flowcurate.models.cli import main

sys.exit(main())
