"""`python -m serving.server ...`: the same as `archive-vision serve ...`."""
import sys

from serving.server.app import main

if __name__ == "__main__":
    sys.exit(main())
