import sys

from flowcurate.cli.main import main

sys.exit(main())
