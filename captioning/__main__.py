"""`python -m captioning`: the VLM captioner (a stage of flowcurate run), issue #5."""

import sys

print("python -m captioning: not yet available in this version (the VLM captioner (a stage of flowcurate run), issue #5).", file=sys.stderr)
sys.exit(2)
